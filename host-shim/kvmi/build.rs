//! Builds the guest images (`../images`, its own workspace, target x86_64-unknown-none),
//! embeds `demo-target`, `test-guest`, `appliance` and `example-agent`, and writes each
//! image's JSON profile. The appliance images are a second build (`-p appliance-image -p
//! example-agent`): they need `alloc`, and a shared build would unify that feature into the
//! images that have no allocator.
//!
//! The images need the freestanding target `x86_64-unknown-none`. When the toolchain lacks it,
//! this script adds it with `rustup target add` (saying so in one line); where that cannot
//! work it stops with a one-line error naming the fix, never a backtrace.
//!
//! Set `KVMI_SKIP_IMAGES=1` to build the VMM without images (the embedded images are then
//! absent and `kvmi run` needs `--image`; the end-to-end tests do not build).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "src/profile.rs"]
#[allow(dead_code)]
mod profile;

const TARGET: &str = "x86_64-unknown-none";
const IMAGES: [&str; 4] = ["demo-target", "test-guest", "appliance", "example-agent"];
/// Extra `cargo build` arguments per build of the images workspace (its default members,
/// then the appliance images, which need `alloc`).
const BUILDS: [&[&str]; 2] = [&[], &["-p", "appliance-image", "-p", "example-agent"]];

/// Environment that must not leak from this (host) build into the nested guest build.
const REMOVE_EXACT: &[&str] = &[
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "RUSTDOCFLAGS",
    "PROFILE",
    "OPT_LEVEL",
    "DEBUG",
    "TARGET",
    "HOST",
    "NUM_JOBS",
    "OUT_DIR",
    "RUSTC_LINKER",
    "CARGO_PRIMARY_PACKAGE",
];
const REMOVE_PREFIXES: &[&str] = &[
    "CARGO_CFG_",
    "CARGO_FEATURE_",
    "CARGO_PROFILE_",
    "CARGO_PKG_",
    "CARGO_MANIFEST_",
    "CARGO_TARGET_",
    "DEP_",
];

fn rerun_tree(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name == "target" || name.starts_with('.') && name != ".cargo" {
            continue;
        }
        if p.is_dir() {
            rerun_tree(&p);
        } else {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
}

/// Stops the build with a one-line error (cargo shows it under the build script's stderr).
fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1)
}

/// True when the toolchain running this build has the standard library for [`TARGET`].
fn target_installed() -> bool {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let Ok(out) = Command::new(rustc).args(["--print", "sysroot"]).output() else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Path::new(&sysroot)
        .join("lib/rustlib")
        .join(TARGET)
        .join("lib")
        .is_dir()
}

/// Makes sure [`TARGET`] is installed, adding it through rustup when it is not.
fn ensure_target() -> Result<(), String> {
    if target_installed() {
        return Ok(());
    }
    let fix = format!("run `rustup target add {TARGET}` (or set KVMI_SKIP_IMAGES=1)");
    println!("cargo:warning=adding the {TARGET} target with rustup (the guest images need it)");
    let mut cmd = Command::new("rustup");
    cmd.args(["target", "add", TARGET]);
    if let Ok(toolchain) = env::var("RUSTUP_TOOLCHAIN") {
        cmd.args(["--toolchain", &toolchain]);
    }
    match cmd.output() {
        Ok(out) if out.status.success() && target_installed() => Ok(()),
        Ok(out) => Err(format!(
            "the guest images need the {TARGET} target and `rustup target add` failed ({}): {fix}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("no message")
                .trim()
        )),
        Err(e) => Err(format!(
            "the guest images need the {TARGET} target and rustup cannot run ({e}): {fix}"
        )),
    }
}

fn build_images(images: &Path, out: &Path) -> Result<PathBuf, String> {
    ensure_target()?;
    let target_dir = out.join("images");
    for extra in BUILDS {
        build_images_with(images, &target_dir, extra)?;
    }
    Ok(target_dir.join(TARGET).join("release"))
}

fn build_images_with(images: &Path, target_dir: &Path, extra: &[&str]) -> Result<(), String> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(images)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(target_dir)
        .args(extra);
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if REMOVE_EXACT.contains(&k.as_str()) || REMOVE_PREFIXES.iter().any(|p| k.starts_with(p)) {
            cmd.env_remove(&k);
        }
    }
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run cargo for the images: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "building the guest images failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let images = manifest.join("../../images");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/profile.rs");
    println!("cargo:rerun-if-env-changed=KVMI_SKIP_IMAGES");
    // Not the images directory itself: cargo would scan its target/ too.
    println!(
        "cargo:rerun-if-changed={}",
        images.join("Cargo.toml").display()
    );
    rerun_tree(&manifest.join("../../hypercall/src"));
    // The appliance image is built from these crates too (and embeds the fixture profile).
    for dir in [
        "../../protocol/src",
        "../../guest-driver/src",
        "../../appliance/src",
    ] {
        rerun_tree(&manifest.join(dir));
    }
    println!(
        "cargo:rerun-if-changed={}",
        manifest
            .join("../../appliance/tests/fixtures/demo-target.profile.json")
            .display()
    );
    rerun_tree(&images);

    let mut generated = String::new();
    let bin_dir = if env::var_os("KVMI_SKIP_IMAGES").is_some() {
        println!("cargo:warning=KVMI_SKIP_IMAGES set: guest images are not embedded");
        None
    } else if !images.join("Cargo.toml").exists() {
        println!(
            "cargo:warning=no images workspace at {}: guest images are not embedded",
            images.display()
        );
        None
    } else {
        match build_images(&images, &out) {
            Ok(dir) => Some(dir),
            Err(e) => fail(&e),
        }
    };
    for name in IMAGES {
        let ident = name.replace('-', "_").to_uppercase();
        let elf = bin_dir
            .as_ref()
            .map(|d| d.join(name))
            .filter(|p| p.exists());
        match elf {
            Some(path) => {
                let bytes = fs::read(&path)
                    .unwrap_or_else(|e| fail(&format!("reading image {}: {e}", path.display())));
                let profile = profile::Profile::from_elf(name, &bytes)
                    .unwrap_or_else(|e| fail(&format!("profile of image {name}: {e}")));
                let json_path = out.join(format!("{name}.profile.json"));
                fs::write(&json_path, profile.to_json())
                    .unwrap_or_else(|e| fail(&format!("writing {}: {e}", json_path.display())));
                let _ = writeln!(
                    generated,
                    "/// The `{name}` image (ELF).\npub const {ident}: Option<&[u8]> = Some(include_bytes!({:?}));\n\
                     /// The JSON profile of `{name}`.\npub const {ident}_PROFILE: Option<&str> = Some(include_str!({:?}));",
                    path.display().to_string(),
                    json_path.display().to_string()
                );
            }
            None => {
                if bin_dir.is_some() {
                    println!("cargo:warning=image `{name}` was not built by the images workspace");
                }
                let _ = writeln!(
                    generated,
                    "/// The `{name}` image (absent in this build).\npub const {ident}: Option<&[u8]> = None;\n\
                     /// The JSON profile of `{name}` (absent in this build).\npub const {ident}_PROFILE: Option<&str> = None;"
                );
            }
        }
    }
    fs::write(out.join("embedded_images.rs"), generated)
        .unwrap_or_else(|e| fail(&format!("writing embedded_images.rs: {e}")));
}
