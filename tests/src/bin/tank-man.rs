//! `tank-man OUT_DIR` (run by `cargo xtask man OUT_DIR`): man pages and shell completions from the clap definitions, so
//! `--help`, the man page and completions never disagree.
//!
//! Layout (what image/Containerfile installs):
//! - `OUT_DIR/man/NAME.1`, and `NAME-SUB.1` for every subcommand (nested ones joined with `-`);
//! - `OUT_DIR/completions/bash/NAME`, `OUT_DIR/completions/zsh/_NAME`,
//!   `OUT_DIR/completions/fish/NAME.fish`.

use std::path::Path;

use anyhow::Context;
use clap_complete::Shell;

/// Every binary that ships, with its clap definition.
fn commands() -> Vec<clap::Command> {
    vec![tank_loader::cli::command(), egress_proxy::cli::command()]
}

fn main() -> anyhow::Result<()> {
    let out = std::env::args_os()
        .nth(1)
        .context("usage: tank-man OUT_DIR")?;
    run(Path::new(&out))
}

/// Writes man pages and completions for every shipped binary under `out_dir`.
fn run(out_dir: &Path) -> anyhow::Result<()> {
    let man_dir = out_dir.join("man");
    std::fs::create_dir_all(&man_dir)
        .with_context(|| format!("cannot create {}", man_dir.display()))?;
    for mut cmd in commands() {
        // Subcommands need their full name (`tank-loader-run`) and the version of the parent.
        cmd.build();
        write_man_pages(&cmd, &man_dir)?;
        for (shell, dir, file) in [
            (Shell::Bash, "bash", cmd.get_name().to_owned()),
            (Shell::Zsh, "zsh", format!("_{}", cmd.get_name())),
            (Shell::Fish, "fish", format!("{}.fish", cmd.get_name())),
        ] {
            let dir = out_dir.join("completions").join(dir);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), cmd.get_name().to_owned(), &mut buf);
            let path = dir.join(file);
            std::fs::write(&path, buf)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        println!(
            "man pages and completions for {} in {}",
            cmd.get_name(),
            out_dir.display()
        );
    }
    Ok(())
}

/// One page for `cmd` and one for each of its subcommands, recursively.
fn write_man_pages(cmd: &clap::Command, dir: &Path) -> anyhow::Result<()> {
    let name = cmd
        .get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_owned();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(name.to_uppercase())
        .render(&mut page)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        write_man_pages(sub, dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_page_per_subcommand_and_completions_for_three_shells() {
        let dir = tempfile_dir();
        run(&dir).unwrap();
        for page in [
            "tank-loader.1",
            "tank-loader-run.1",
            "tank-loader-audit.1",
            "tank-loader-audit-verify.1",
        ] {
            let text = std::fs::read_to_string(dir.join("man").join(page))
                .unwrap_or_else(|e| panic!("{page}: {e}"));
            assert!(text.contains(".TH"), "{page} is not a man page");
        }
        let run_page = std::fs::read_to_string(dir.join("man/tank-loader-run.1")).unwrap();
        assert!(
            run_page.contains("config"),
            "the run page documents --config"
        );
        assert!(
            std::fs::read_to_string(dir.join("completions/bash/tank-loader"))
                .unwrap()
                .contains("detach")
        );
        assert!(dir.join("completions/zsh/_tank-loader").exists());
        assert!(dir.join("completions/fish/tank-loader.fish").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-man-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }
}
