//! The doorbell routine's exact bytes ([`guest_driver::port::doorbell_code`]) run in a real
//! KVM VM (64-bit, CPL0): the test plays the VMM, checks the registers at the port exit and
//! returns a value in RAX that the routine hands back.

use guest_driver::port::doorbell_code;
use hypercall::ports::HYPERCALL_DOORBELL;
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};
use memmap2::{MmapMut, MmapOptions};

const MEM: usize = 4 << 20;
const PML4: u64 = 0x1000;
const GDT: u64 = 0x500;
const STACK_TOP: u64 = 0x8000;
const HALT_AT: u64 = 0x1_0000;
const CODE_AT: u64 = 0x2_0000;
const ARGS_AT: u64 = 0x3_0000;

/// The test VM's RAM: `MEM` bytes of anonymous private memory (`map_anon` is
/// `mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)`).
struct GuestRam {
    map: MmapMut,
}

impl GuestRam {
    fn new() -> Self {
        GuestRam {
            map: MmapOptions::new().len(MEM).map_anon().unwrap(),
        }
    }

    fn write(&mut self, gpa: u64, bytes: &[u8]) {
        let at = gpa as usize;
        self.map[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn write_u64(&mut self, gpa: u64, value: u64) {
        self.write(gpa, &value.to_le_bytes());
    }
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

#[test]
fn doorbell_bytes_make_the_documented_hypercall_in_a_real_vm() {
    let Ok(kvm) = Kvm::new() else {
        println!("SKIPPED: /dev/kvm not available");
        return;
    };
    let code = doorbell_code();
    assert!(
        code.len() > 8 && code.len() < 64,
        "routine of {} bytes",
        code.len()
    );
    assert!(
        code.windows(2)
            .any(|w| w == [0xe7, HYPERCALL_DOORBELL as u8]),
        "out imm8, eax"
    );

    let mut ram = GuestRam::new();
    // Identity map of the first 4 MiB with 2 MiB pages.
    ram.write_u64(PML4, 0x2000 | 3);
    ram.write_u64(0x2000, 0x3000 | 3);
    ram.write_u64(0x3000, 0x83);
    ram.write_u64(0x3008, 0x20_0000 | 0x83);
    ram.write_u64(GDT + 8, 0x00af_9b00_0000_ffff);
    ram.write_u64(GDT + 16, 0x00cf_9300_0000_ffff);
    ram.write(HALT_AT, &[0xf4]); // hlt
    ram.write(CODE_AT, code);
    ram.write_u64(STACK_TOP - 8, HALT_AT); // return address of the routine
    let args = [0x1111, 0x2222_0000_0000, 0x3333, 0x4444, 24];
    for (i, a) in args.iter().enumerate() {
        ram.write_u64(ARGS_AT + 8 * i as u64, *a);
    }

    let vm = kvm.create_vm().unwrap();
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: ram.map.as_ptr() as u64,
        flags: 0,
    };
    // SAFETY: the region is our live mapping of MEM bytes, which outlives the VM (`ram` is
    // declared before `vm` and dropped after it).
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs = segment(0x08, true);
    for seg in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        *seg = segment(0x10, false);
    }
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 23;
    sregs.cr3 = PML4;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = 0x8005_0033; // PG | WP | NE | ET | MP | PE
    sregs.efer = 0x500; // LMA | LME
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = CODE_AT;
    regs.rsp = STACK_TOP - 8;
    regs.rflags = 2;
    regs.rdi = hypercall::call::Hypercall::MapRange.number();
    regs.rsi = ARGS_AT;
    regs.rbx = 0xb0b0; // callee-saved: must survive
    vcpu.set_regs(&regs).unwrap();

    let mut exits = 0;
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(port, data) => {
                assert_eq!(port, HYPERCALL_DOORBELL);
                assert_eq!(data.len(), 4, "32-bit out");
                exits += 1;
                let mut r = vcpu.get_regs().unwrap();
                assert_eq!(r.rax, hypercall::call::Hypercall::MapRange.number());
                assert_eq!([r.rbx, r.rcx, r.rdx, r.rsi, r.rdi], args);
                r.rax = 77; // the "VMM" result
                vcpu.set_regs(&r).unwrap();
            }
            VcpuExit::Hlt => break,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    assert_eq!(exits, 1);
    let r = vcpu.get_regs().unwrap();
    assert_eq!(r.rax, 77, "the routine returns RAX as the VMM left it");
    assert_eq!(r.rbx, 0xb0b0, "RBX restored");
    assert_eq!(r.rsp, STACK_TOP, "returned through the stack");
    assert_eq!(r.rip, HALT_AT + 1);
    drop(vcpu);
    drop(vm);
}
