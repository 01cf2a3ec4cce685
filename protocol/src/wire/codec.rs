//! Bounds-checked reading and writing helpers shared by the wire profiles.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{EncodeError, ProtocolError};
use crate::frame::{HEADER_SIZE, Header};

/// Reads structs off the front of a payload, never past its end.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
    total: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self {
            buf,
            what,
            total: buf.len(),
        }
    }

    fn consumed(&self) -> usize {
        self.total - self.buf.len()
    }

    /// A view of the next `T` (`-KVM_EINVAL` if the payload is too short).
    pub(crate) fn take<T>(&mut self) -> Result<&'a T, ProtocolError>
    where
        T: FromBytes + KnownLayout + Immutable + Unaligned,
    {
        let needed = self.consumed() + size_of::<T>();
        let (value, rest) = T::ref_from_prefix(self.buf).map_err(|_| ProtocolError::Truncated {
            what: self.what,
            needed,
            got: self.total,
        })?;
        self.buf = rest;
        Ok(value)
    }

    /// The next `count * stride` bytes of an array (`-KVM_EINVAL` if they overrun).
    pub(crate) fn take_array(
        &mut self,
        array: &'static str,
        count: usize,
        stride: usize,
    ) -> Result<&'a [u8], ProtocolError> {
        let overrun = ProtocolError::CountOverrun { what: array, count };
        let len = count.checked_mul(stride).ok_or(overrun)?;
        if len > self.buf.len() {
            return Err(overrun);
        }
        let (head, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(head)
    }

    /// Everything not yet read.
    pub(crate) fn rest(self) -> &'a [u8] {
        self.buf
    }

    /// `-KVM_EINVAL` if bytes are left over.
    pub(crate) fn finish(self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::SizeMismatch {
                what: self.what,
                expected: self.consumed(),
                got: self.total,
            })
        }
    }
}

/// `-KVM_EINVAL` unless `padding` is all zero.
pub(crate) fn zero_padding(padding: &[u8], what: &'static str) -> Result<(), ProtocolError> {
    if padding.iter().all(|b| *b == 0) {
        Ok(())
    } else {
        Err(ProtocolError::NonZeroPadding(what))
    }
}

/// A `0`/`1` byte as a bool (`-KVM_EINVAL` otherwise).
pub(crate) fn flag(value: u8, field: &'static str) -> Result<bool, ProtocolError> {
    match value {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(ProtocolError::InvalidValue {
            field,
            value: value.into(),
        }),
    }
}

/// Writes a message into a buffer already checked to be large enough.
pub(crate) struct Writer<'b> {
    buf: &'b mut [u8],
    pos: usize,
    overflow: bool,
}

impl Writer<'_> {
    pub(crate) fn put<T: IntoBytes + Immutable + ?Sized>(&mut self, value: &T) {
        self.put_bytes(value.as_bytes());
    }

    pub(crate) fn put_bytes(&mut self, bytes: &[u8]) {
        let end = self.pos.saturating_add(bytes.len());
        match self.buf.get_mut(self.pos..end) {
            Some(dst) => dst.copy_from_slice(bytes),
            None => self.overflow = true,
        }
        self.pos = end;
    }
}

/// Encode one message of `payload_len` bytes: check sizes, write the header, let `body`
/// write the payload, and check it wrote exactly `payload_len` bytes.
pub(crate) fn encode_message(
    id: u16,
    seq: u32,
    payload_len: usize,
    max_msg_size: usize,
    buf: &mut [u8],
    body: impl FnOnce(&mut Writer<'_>),
) -> Result<usize, EncodeError> {
    let total = message_len(payload_len, max_msg_size)?;
    let available = buf.len();
    let dst = buf.get_mut(..total).ok_or(EncodeError::BufferTooSmall {
        needed: total,
        available,
    })?;
    let size = u16::try_from(payload_len).map_err(|_| EncodeError::TooLarge {
        size: payload_len,
        max: usize::from(u16::MAX),
    })?;
    let mut w = Writer {
        buf: dst,
        pos: 0,
        overflow: false,
    };
    w.put(&Header { id, size, seq }.to_wire());
    body(&mut w);
    if w.overflow || w.pos != total {
        // A codec bug, reported instead of sending a malformed message.
        return Err(EncodeError::TooLarge {
            size: w.pos.saturating_sub(HEADER_SIZE),
            max: payload_len,
        });
    }
    Ok(total)
}

/// Whole-message length for a payload, checked against the header's `u16` and the profile.
pub(crate) fn message_len(payload_len: usize, max_msg_size: usize) -> Result<usize, EncodeError> {
    let max = max_msg_size
        .saturating_sub(HEADER_SIZE)
        .min(usize::from(u16::MAX));
    if payload_len > max {
        return Err(EncodeError::TooLarge {
            size: payload_len,
            max,
        });
    }
    Ok(HEADER_SIZE + payload_len)
}
