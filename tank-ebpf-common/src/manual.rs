//! Man pages and shell completions rendered from a binary's own clap definition, so `--help`,
//! the man page and the completions never disagree. Each shipped binary calls [`generate`]
//! from its hidden `generate-manual` subcommand (`cargo xtask man` runs both); living here,
//! the one rendering serves both binaries and the image build compiles no test code for it.
//!
//! Layout under the output directory (what image/Containerfile installs):
//! - `man/NAME.1`, and `NAME-SUB.1` for every subcommand (nested ones joined with `-`);
//! - `completions/bash/NAME`, `completions/zsh/_NAME`, `completions/fish/NAME.fish`.

use std::io;
use std::path::Path;

use clap_complete::Shell;

/// Writes the man pages and completions of `cmd` under `out_dir`.
pub fn generate(mut cmd: clap::Command, out_dir: &Path) -> io::Result<()> {
    // Subcommands need their full name (`tank-loader-run`) and the version of the parent.
    cmd.build();
    let man_dir = out_dir.join("man");
    std::fs::create_dir_all(&man_dir).map_err(|e| at(&man_dir, e))?;
    write_man_pages(&cmd, &man_dir)?;
    let name = cmd.get_name().to_owned();
    for (shell, dir, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let dir = out_dir.join("completions").join(dir);
        std::fs::create_dir_all(&dir).map_err(|e| at(&dir, e))?;
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), &name, &mut buf);
        let path = dir.join(file);
        std::fs::write(&path, buf).map_err(|e| at(&path, e))?;
    }
    Ok(())
}

/// One page for `cmd` and one for each of its visible subcommands, recursively.
fn write_man_pages(cmd: &clap::Command, dir: &Path) -> io::Result<()> {
    let name = cmd
        .get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_owned();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(name.to_uppercase())
        .render(&mut page)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, page).map_err(|e| at(&path, e))?;
    for sub in cmd
        .get_subcommands()
        .filter(|s| s.get_name() != "help" && !s.is_hide_set())
    {
        write_man_pages(sub, dir)?;
    }
    Ok(())
}

fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}
