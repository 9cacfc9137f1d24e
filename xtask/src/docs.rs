//! `cargo xtask docs`: shell completions and man pages for the `gatekeeper` command, generated
//! from its parser (`gatekeeper::cli::command`), so they never drift from `--help`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap_complete::Shell;

/// The shells completions are written for.
const SHELLS: [Shell; 4] = [Shell::Bash, Shell::Zsh, Shell::Fish, Shell::Elvish];

/// Writes `out/completions/` (one file per shell) and `out/man/` (`gatekeeper.1` and one page per
/// subcommand, `gatekeeper-get.1`, ...); returns the files written.
pub fn generate(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions).with_context(|| format!("creating {}", completions.display()))?;
    for shell in SHELLS {
        let mut cmd = gatekeeper::cli::command();
        let path = clap_complete::generate_to(shell, &mut cmd, "gatekeeper", &completions)
            .with_context(|| format!("writing the {shell} completions to {}", completions.display()))?;
        written.push(path);
    }
    let man = out.join("man");
    std::fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    clap_mangen::generate_to(gatekeeper::cli::command(), &man)
        .with_context(|| format!("writing the man pages to {}", man.display()))?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&man)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    pages.sort();
    written.extend(pages);
    Ok(written)
}

/// `cargo xtask docs --out DIR`.
pub fn run(out: &Path) -> anyhow::Result<()> {
    crate::step(&format!("Writing the gatekeeper shell completions and man pages to {}", out.display()));
    for path in generate(out)? {
        println!("{}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_and_man_pages_are_written_and_name_the_commands() {
        let dir = std::env::temp_dir().join(format!("gk-xtask-docs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let written = generate(&dir).unwrap();
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        for path in &written {
            assert!(std::fs::metadata(path).unwrap().len() > 0, "{} is empty", path.display());
        }
        let bash = read(&dir.join("completions/gatekeeper.bash"));
        assert!(bash.contains("describe") && bash.contains("--token-file"), "bash completion lacks commands");
        assert!(read(&dir.join("completions/_gatekeeper")).contains("describe"));
        let man = read(&dir.join("man/gatekeeper.1"));
        assert!(man.starts_with(".ie") || man.contains(".TH gatekeeper"), "{}", &man[..man.len().min(200)]);
        assert!(man.contains("Exit codes") && man.contains("describe"));
        let get = read(&dir.join("man/gatekeeper-get.1"));
        assert!(get.contains("selector") && get.contains("api"), "the subcommand page has its options");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
