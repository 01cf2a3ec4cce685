//! Events and registers as JSON values (the CLI prints them as JSON lines).

use protocol::kvm::KvmRegs;
use protocol::{EventPayload, event::Event};
use serde_json::{Value, json};

use super::{ReceivedEvent, event_name};

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

/// The general-purpose registers as a JSON object of hex strings.
pub fn regs_json(r: &KvmRegs) -> Value {
    json!({
        "rax": hex(r.rax.get()), "rbx": hex(r.rbx.get()), "rcx": hex(r.rcx.get()),
        "rdx": hex(r.rdx.get()), "rsi": hex(r.rsi.get()), "rdi": hex(r.rdi.get()),
        "rsp": hex(r.rsp.get()), "rbp": hex(r.rbp.get()), "r8": hex(r.r8.get()),
        "r9": hex(r.r9.get()), "r10": hex(r.r10.get()), "r11": hex(r.r11.get()),
        "r12": hex(r.r12.get()), "r13": hex(r.r13.get()), "r14": hex(r.r14.get()),
        "r15": hex(r.r15.get()), "rip": hex(r.rip.get()), "rflags": hex(r.rflags.get()),
    })
}

/// The event-specific fields.
pub fn payload_json(payload: &EventPayload) -> Value {
    match *payload {
        EventPayload::Cr {
            cr,
            old_value,
            new_value,
        } => json!({"cr": cr, "old_value": hex(old_value), "new_value": hex(new_value)}),
        EventPayload::Msr {
            msr,
            old_value,
            new_value,
        } => {
            json!({"msr": hex(msr.into()), "old_value": hex(old_value), "new_value": hex(new_value)})
        }
        EventPayload::Breakpoint { gpa } => json!({"gpa": hex(gpa)}),
        EventPayload::PageFault { gva, gpa, mode } => {
            let access: String = [(1, 'r'), (2, 'w'), (4, 'x')]
                .into_iter()
                .map(|(bit, c)| if mode & bit != 0 { c } else { '-' })
                .collect();
            json!({"gva": hex(gva), "gpa": hex(gpa), "mode": mode, "access": access})
        }
        EventPayload::Trap {
            vector,
            kind,
            error_code,
            cr2,
        } => {
            json!({"vector": vector, "type": kind, "error_code": hex(error_code.into()), "cr2": hex(cr2)})
        }
        EventPayload::Descriptor {
            arch,
            descriptor,
            write,
        } => {
            json!({"descriptor": descriptor.value(), "write": write, "arch": [hex(arch[0]), hex(arch[1])]})
        }
        EventPayload::PauseVcpu
        | EventPayload::Xsetbv
        | EventPayload::Hypercall
        | EventPayload::CreateVcpu
        | EventPayload::Singlestep => json!({}),
    }
}

/// An event as one JSON object: seq, vCPU, event name, mode, rip, rsp, cr3, cpl, the payload
/// fields (and the argument registers of a hypercall).
pub fn event_json(seq: u32, event: &Event) -> Value {
    let c = &event.common;
    let mut v = json!({
        "seq": seq,
        "vcpu": c.vcpu,
        "event": event_name(event.payload.kind()),
        "mode": c.mode.bytes() * 8,
        "rip": hex(c.regs.rip.get()),
        "rsp": hex(c.regs.rsp.get()),
        "cr3": hex(c.sregs.cr3.get()),
        "cpl": c.sregs.cs.dpl,
    });
    if event.payload.kind() == protocol::EventKind::Hypercall {
        // The agent call's number and arguments (docs/protocol.md: RAX, then RBX/RCX/RDX/RSI).
        let r = &c.regs;
        if let Value::Object(map) = &mut v {
            for (name, value) in [
                ("rax", r.rax.get()),
                ("rbx", r.rbx.get()),
                ("rcx", r.rcx.get()),
                ("rdx", r.rdx.get()),
                ("rsi", r.rsi.get()),
                ("rdi", r.rdi.get()),
            ] {
                map.insert(name.into(), hex(value).into());
            }
        }
    }
    if let (Value::Object(map), Value::Object(extra)) = (&mut v, payload_json(&event.payload)) {
        map.extend(extra);
    }
    v
}

/// A received event as one JSON object (see [`event_json`]).
pub fn received_json(ev: &ReceivedEvent) -> Value {
    event_json(ev.seq, &ev.event)
}
