//! Progress on long work (`dlq replay --all`, `observers backfill`, `export`): an indicatif bar
//! on stderr when stderr is a terminal, and nothing at all when it is not, so scripts and tests
//! read only the command's stdout lines, as before. The counts are kept either way (a hidden bar
//! still counts), and the bar's last message is the command's tally.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One bar (a known amount of work) or spinner (an unknown amount).
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar over `total` steps, drawn on stderr only when it is a terminal.
    pub fn bar(total: u64, unit: &str) -> Self {
        Self::drawn_on(total, unit, stderr_target())
    }

    /// A spinner for work whose size is unknown (an export streams until the server is done).
    pub fn spinner(unit: &str) -> Self {
        let bar = ProgressBar::with_draw_target(None, stderr_target());
        bar.set_style(spinner_style(unit).unwrap_or_else(|_| ProgressStyle::default_spinner()));
        bar.enable_steady_tick(Duration::from_millis(200));
        Self { bar }
    }

    fn drawn_on(total: u64, unit: &str, target: ProgressDrawTarget) -> Self {
        let bar = ProgressBar::with_draw_target(Some(total), target);
        bar.set_style(bar_style(unit).unwrap_or_else(|_| ProgressStyle::default_bar()));
        Self { bar }
    }

    /// A bar that is never drawn, counting all the same.
    pub fn hidden(total: Option<u64>) -> Self {
        Self {
            bar: ProgressBar::with_draw_target(total, ProgressDrawTarget::hidden()),
        }
    }

    pub fn advance(&self, steps: u64) {
        self.bar.inc(steps);
    }

    pub fn set_position(&self, position: u64) {
        self.bar.set_position(position);
    }

    pub fn tally(&self, message: String) {
        self.bar.set_message(message);
    }

    /// Prints a line to stderr without tearing the bar (an error on one item, say).
    pub fn warn(&self, line: &str) {
        self.bar.suspend(|| eprintln!("{line}"));
    }

    pub fn position(&self) -> u64 {
        self.bar.position()
    }

    pub fn message(&self) -> String {
        self.bar.message()
    }

    /// Leaves the finished bar (and its tally) on the terminal.
    pub fn finish(&self) {
        self.bar.finish();
    }

    /// Whether anything is drawn (stderr is a terminal).
    pub fn is_drawn(&self) -> bool {
        !self.bar.is_hidden()
    }
}

fn bar_style(unit: &str) -> Result<ProgressStyle, indicatif::style::TemplateError> {
    ProgressStyle::with_template(&format!(
        "{{bar:40}} {{human_pos}}/{{human_len}} {unit} {{msg}} [{{elapsed_precise}}, {{eta}} left]"
    ))
}

fn spinner_style(unit: &str) -> Result<ProgressStyle, indicatif::style::TemplateError> {
    ProgressStyle::with_template(&format!(
        "{{spinner}} {{human_pos}} {unit} ({{per_sec}}) {{msg}} [{{elapsed_precise}}]"
    ))
}

fn stderr_target() -> ProgressDrawTarget {
    if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hidden_bar_counts_and_keeps_its_tally() {
        let progress = Progress::hidden(Some(10));
        progress.advance(3);
        progress.advance(4);
        progress.tally("7 replayed".into());
        assert_eq!(progress.position(), 7);
        assert_eq!(progress.message(), "7 replayed");
        assert!(!progress.is_drawn());
        progress.finish();
    }

    #[test]
    fn the_styles_parse() {
        assert!(bar_style("events").is_ok());
        assert!(spinner_style("rows").is_ok());
    }
}
