//! The hostile tool of the end-to-end tests: a raw KVMI socket client that misbehaves on
//! request, run as a child process so that a test can stop, resume and kill it
//! (`kvmi_tests::hostile`).

fn main() -> std::process::ExitCode {
    kvmi_tests::hostile::child_main()
}
