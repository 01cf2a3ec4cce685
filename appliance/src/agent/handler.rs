//! Event handlers: one method per event kind, each returning the reply.

use protocol::event::{DescriptorTable, EventPayload};
use protocol::event_reply::PageFaultReply;
use protocol::{Action, Event, EventReply, EventReplyData};
use serde::Serialize;

/// What a handler may do besides answering: know where the event came from and write
/// findings to the log ring.
pub trait EventContext {
    /// The vCPU whose ring carried the event.
    fn vcpu(&self) -> u32;
    /// The event's sequence number.
    fn seq(&self) -> u32;
    /// Writes `value` as one JSON line on the log ring (dropped if the ring is full).
    fn emit(&mut self, value: &dyn erased::Json) -> bool;
}

/// Object-safe JSON serialization for [`EventContext::emit`].
pub mod erased {
    use serde::Serialize;

    /// Anything serializable, as a trait object.
    pub trait Json {
        /// The value as JSON text.
        fn to_json(&self) -> Result<alloc::vec::Vec<u8>, serde_json::Error>;
    }

    impl<T: Serialize + ?Sized> Json for T {
        fn to_json(&self) -> Result<alloc::vec::Vec<u8>, serde_json::Error> {
            serde_json::to_vec(self)
        }
    }
}

/// The reply that lets `event` proceed unchanged: CONTINUE, with the value being written for
/// CR and MSR events and no emulation context for page faults.
pub fn default_reply(event: &Event) -> EventReply<'static> {
    let data = match event.payload {
        EventPayload::Cr { new_value, .. } => EventReplyData::Cr { new_val: new_value },
        EventPayload::Msr { new_value, .. } => EventReplyData::Msr { new_val: new_value },
        EventPayload::PageFault { .. } => EventReplyData::PageFault(PageFaultReply::default()),
        _ => EventReplyData::None,
    };
    EventReply {
        event: event.kind(),
        action: Action::Continue,
        data,
    }
}

/// A reply with `action` and the default data of `event`.
pub fn reply_with(event: &Event, action: Action) -> EventReply<'static> {
    EventReply {
        action,
        ..default_reply(event)
    }
}

/// Handles events. Every method defaults to [`default_reply`]; override the ones you need.
/// [`on_event`](Self::on_event) dispatches on the payload.
#[allow(unused_variables)]
pub trait EventHandler {
    /// Dispatches `event` to the method of its kind.
    fn on_event(&mut self, ctx: &mut dyn EventContext, event: &Event) -> EventReply<'static> {
        match event.payload {
            EventPayload::PauseVcpu => self.on_pause(ctx, event),
            EventPayload::Cr {
                cr,
                old_value,
                new_value,
            } => self.on_cr(ctx, event, cr, old_value, new_value),
            EventPayload::Msr {
                msr,
                old_value,
                new_value,
            } => self.on_msr(ctx, event, msr, old_value, new_value),
            EventPayload::Xsetbv => self.on_xsetbv(ctx, event),
            EventPayload::Breakpoint { gpa } => self.on_breakpoint(ctx, event, gpa),
            EventPayload::Hypercall => self.on_hypercall(ctx, event),
            EventPayload::PageFault { gva, gpa, mode } => {
                self.on_page_fault(ctx, event, gva, gpa, mode)
            }
            EventPayload::Trap {
                vector,
                error_code,
                cr2,
                ..
            } => self.on_trap(ctx, event, vector, error_code, cr2),
            EventPayload::Descriptor {
                descriptor, write, ..
            } => self.on_descriptor(ctx, event, descriptor, write),
            EventPayload::CreateVcpu => self.on_create_vcpu(ctx, event),
            EventPayload::Singlestep => self.on_singlestep(ctx, event),
        }
    }
    /// A vCPU paused on request.
    fn on_pause(&mut self, ctx: &mut dyn EventContext, event: &Event) -> EventReply<'static> {
        default_reply(event)
    }
    /// A control-register write.
    fn on_cr(
        &mut self,
        ctx: &mut dyn EventContext,
        event: &Event,
        cr: u16,
        old: u64,
        new: u64,
    ) -> EventReply<'static> {
        default_reply(event)
    }
    /// An MSR write.
    fn on_msr(
        &mut self,
        ctx: &mut dyn EventContext,
        event: &Event,
        msr: u32,
        old: u64,
        new: u64,
    ) -> EventReply<'static> {
        default_reply(event)
    }
    /// An XCR0 write.
    fn on_xsetbv(&mut self, ctx: &mut dyn EventContext, event: &Event) -> EventReply<'static> {
        default_reply(event)
    }
    /// A breakpoint at guest-physical `gpa`.
    fn on_breakpoint(
        &mut self,
        ctx: &mut dyn EventContext,
        event: &Event,
        gpa: u64,
    ) -> EventReply<'static> {
        default_reply(event)
    }
    /// The guest agent hypercall.
    fn on_hypercall(&mut self, ctx: &mut dyn EventContext, event: &Event) -> EventReply<'static> {
        default_reply(event)
    }
    /// An access to a restricted page (`mode`: bit 0 read, 1 write, 2 fetch).
    fn on_page_fault(
        &mut self,
        ctx: &mut dyn EventContext,
        event: &Event,
        gva: u64,
        gpa: u64,
        mode: u32,
    ) -> EventReply<'static> {
        default_reply(event)
    }
    /// An exception about to be delivered.
    fn on_trap(
        &mut self,
        ctx: &mut dyn EventContext,
        event: &Event,
        vector: u32,
        error_code: u32,
        cr2: u64,
    ) -> EventReply<'static> {
        default_reply(event)
    }
    /// A descriptor-table register access.
    fn on_descriptor(
        &mut self,
        ctx: &mut dyn EventContext,
        event: &Event,
        table: DescriptorTable,
        write: bool,
    ) -> EventReply<'static> {
        default_reply(event)
    }
    /// A vCPU was created.
    fn on_create_vcpu(&mut self, ctx: &mut dyn EventContext, event: &Event) -> EventReply<'static> {
        default_reply(event)
    }
    /// A single step completed.
    fn on_singlestep(&mut self, ctx: &mut dyn EventContext, event: &Event) -> EventReply<'static> {
        default_reply(event)
    }
}

/// Serializable summary of an event, for JSON lines.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct EventSummary {
    /// Event kind name.
    pub event: &'static str,
    /// vCPU.
    pub vcpu: u16,
    /// RIP.
    pub rip: u64,
    /// CR3.
    pub cr3: u64,
}

impl EventSummary {
    /// Summarizes `event`.
    pub fn of(event: &Event) -> Self {
        EventSummary {
            event: kind_name(event),
            vcpu: event.common.vcpu,
            rip: event.common.regs.rip.get(),
            cr3: event.common.sregs.cr3.get(),
        }
    }
}

/// A short lowercase name of an event's kind.
pub fn kind_name(event: &Event) -> &'static str {
    use protocol::EventKind::*;
    match event.kind() {
        Cr => "cr",
        Msr => "msr",
        Xsetbv => "xsetbv",
        Breakpoint => "breakpoint",
        Hypercall => "hypercall",
        PageFault => "page_fault",
        Trap => "trap",
        Descriptor => "descriptor",
        CreateVcpu => "create_vcpu",
        PauseVcpu => "pause_vcpu",
        Singlestep => "singlestep",
    }
}
