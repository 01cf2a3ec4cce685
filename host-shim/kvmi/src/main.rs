//! `kvmi`: run target VMs (and the appliance VM that watches them) on KVM, introspect a
//! running VM over its KVMI socket, probe what this host's KVM delivers, benchmark.

fn main() -> std::process::ExitCode {
    kvmi::app::main()
}
