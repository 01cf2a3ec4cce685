//! `kvmi` (temporary minimal CLI).
fn main() {
    if std::env::args().nth(1).as_deref() == Some("caps") {
        let c = host_shim::probe_capabilities().unwrap();
        print!("{}", c.table());
        return;
    }
    let img = host_shim::images::Image::TestGuest.elf().expect("no image");
    let cfg = host_shim::VmConfig {
        cmdline: std::env::args().nth(1).unwrap_or_default(),
        ..Default::default()
    };
    let r = host_shim::run_image(
        cfg,
        img,
        host_shim::SerialSink::Stdout,
        host_shim::RunLimits {
            timeout: Some(std::time::Duration::from_secs(5)),
            interrupt: None,
        },
    )
    .unwrap();
    println!("{} {:?}", r.outcome, r.elapsed);
}
