//! The `kvmi` command, built inside this package so that its end-to-end tests can run it
//! (a test can only name binaries of its own package). It is the same program as the `kvmi`
//! binary: both are `kvmi::app::main`.

fn main() -> std::process::ExitCode {
    kvmi::app::main()
}
