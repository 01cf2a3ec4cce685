//! KVMI wire protocol (being written).
