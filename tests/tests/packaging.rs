//! The shipped service unit and the Debian package: the unit passes
//! `systemd-analyze verify`, and `cargo xtask package` makes a .deb whose
//! files are where Debian wants them and whose example configuration the
//! packaged binary accepts; what the package generates with the binary (the
//! man page, completions) survives a reader that stops early.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use xdplb_tests::{bin_path, netns::unique_prefix, RemoveOnDrop};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A scratch directory removed on drop.
fn scratch(tag: &str) -> RemoveOnDrop {
    let dir = std::env::temp_dir().join(format!("xdplb-{}", unique_prefix(tag)));
    std::fs::create_dir_all(&dir).unwrap();
    RemoveOnDrop(dir)
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    if !have("systemd-analyze") {
        eprintln!("SKIPPED: systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    let scratch = scratch("unit");
    // The unit as shipped, its binary path pointed at the one built here
    // (verify checks that ExecStart= names an executable).
    let xdplb = bin_path("xdplb").unwrap();
    let unit = std::fs::read_to_string(workspace_root().join("examples/xdplb.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/xdplb run"), "{unit}");
    let path = scratch.0.join("xdplb.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/xdplb", &xdplb.display().to_string()),
    )
    .unwrap();
    // --man=no: the man page is only installed by the package.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {err}");
    assert!(
        !err.contains("xdplb.service"),
        "warnings about the unit: {err}"
    );
}

#[test]
fn the_package_installs_a_working_binary_unit_config_and_docs() {
    if !have("dpkg-deb") {
        eprintln!("SKIPPED: dpkg-deb is not installed");
        return;
    }
    let scratch = scratch("deb");
    let started = std::time::Instant::now();
    // The debug binary the tests already built: packaging only.
    let out = Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args([
            "xtask",
            "package",
            "--profile",
            "dev",
            "--no-build",
            "--fast",
            "--output",
        ])
        .arg(&scratch.0)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo xtask package: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("cargo xtask package took {:?}", started.elapsed());
    let deb = std::fs::read_dir(&scratch.0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb in the output directory");
    // `PROGRAM FLAG deb dir`: extracts part of the package into dir.
    let extract = |program: &str, flag: &str, dir: &Path| {
        let status = Command::new(program).arg(flag).arg(&deb).arg(dir).status();
        assert!(status.unwrap().success(), "{program} {flag}");
    };
    let root = scratch.0.join("root");
    extract("dpkg", "-x", &root);
    for file in [
        "usr/bin/xdplb",
        "lib/systemd/system/xdplb.service",
        "etc/xdplb/xdplb.toml",
        "usr/share/man/man1/xdplb.1.gz",
        "usr/share/bash-completion/completions/xdplb",
        "usr/share/zsh/vendor-completions/_xdplb",
        "usr/share/fish/vendor_completions.d/xdplb.fish",
    ] {
        let path = root.join(file);
        let len = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{file} missing from the package: {e}"))
            .len();
        assert!(len > 0, "{file} is empty");
    }
    let ctrl = scratch.0.join("control");
    extract("dpkg-deb", "-e", &ctrl);
    let conffiles = std::fs::read_to_string(ctrl.join("conffiles")).unwrap_or_default();
    assert!(
        conffiles.lines().any(|l| l == "/etc/xdplb/xdplb.toml"),
        "conffiles: {conffiles:?}"
    );
    let control = std::fs::read_to_string(ctrl.join("control")).unwrap();
    assert!(control.contains("Package: xdplb"), "{control}");

    // The packaged binary accepts the packaged configuration.
    let out = Command::new(root.join("usr/bin/xdplb"))
        .arg("check")
        .arg("--config")
        .arg(root.join("etc/xdplb/xdplb.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "xdplb check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("configuration is valid"), "{said}");
}

/// `xdplb man | head -1`: output whose reader went away ends the command
/// quietly and successfully, as it ends a C tool (SIGPIPE), rather than with
/// "Broken pipe" or a panic.
#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    let xdplb = bin_path("xdplb").unwrap();
    let example = workspace_root().join("examples/xdplb.toml");
    for args in [
        &["man"][..],
        &["completions", "bash"],
        &["check", "--config"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut command = Command::new(&xdplb);
        command.args(args).stdout(writer);
        if args[0] == "check" {
            command.arg(&example);
        }
        let out = command.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.is_empty(),
            "{args:?}: {:?} {err}",
            out.status
        );
    }
}
