//! `herald completions <shell>`: the shell's completion script for every command and flag, on
//! standard output. Install it the shell's way, e.g.
//! `herald completions bash > /etc/bash_completion.d/herald`.

use std::io::Write;

use clap::CommandFactory;

use crate::Cli;

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    pub shell: clap_complete::Shell,
}

pub fn run(args: &CompletionsArgs, out: &mut impl Write) -> std::io::Result<()> {
    // Rendered first, then written: clap_complete panics on a failed write (a closed pipe),
    // and an error is what the caller should see instead.
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "herald", &mut script);
    out.write_all(&script)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_naming_the_commands() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            run(&CompletionsArgs { shell }, &mut out).expect("written");
            let script = String::from_utf8(out).expect("text");
            for word in ["herald", "dlq", "replay", "checkpoint", "completions"] {
                assert!(script.contains(word), "{shell}: no {word}");
            }
        }
    }
}
