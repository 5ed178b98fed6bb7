//! `tank-loader generate-manual` (run by `cargo xtask man`): a man page per subcommand and
//! completions for three shells, from the binary's own clap definition. No root needed.

use std::process::Command;

#[test]
fn writes_a_page_per_subcommand_and_completions_for_three_shells() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tank-loader"))
        .arg("generate-manual")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "tank-loader.1",
        "tank-loader-run.1",
        "tank-loader-audit.1",
        "tank-loader-audit-verify.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join("man").join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page} is not a man page");
    }
    let run_page = std::fs::read_to_string(dir.path().join("man/tank-loader-run.1")).unwrap();
    assert!(
        run_page.contains("config"),
        "the run page documents --config"
    );
    // Internal subcommands get no page.
    for hidden in ["watch-layers", "generate-manual"] {
        assert!(!dir
            .path()
            .join(format!("man/tank-loader-{hidden}.1"))
            .exists());
    }
    let bash = std::fs::read_to_string(dir.path().join("completions/bash/tank-loader")).unwrap();
    assert!(bash.contains("detach"), "{bash}");
    assert!(dir.path().join("completions/zsh/_tank-loader").exists());
    assert!(dir
        .path()
        .join("completions/fish/tank-loader.fish")
        .exists());
}
