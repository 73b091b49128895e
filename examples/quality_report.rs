//! The quality study's planner and report (`docs/quality.md`); `benchmarks/quality.sh` runs it.
//!
//! ```sh
//! quality_report plan --preset full --phase sweep --root STUDY --data benchmarks/quality/data
//! quality_report plan --preset full --phase study --root STUDY --data benchmarks/quality/data
//! quality_report report --preset full --root STUDY --out-dir docs/quality
//! ```
//!
//! `plan` writes the run files and prints the plan file (one run a line: its folder, the file
//! that says it finished, phase, task, method, seed, lr); the study phase needs a finished
//! sweep (it picks each method's rate from it). `report` writes `<preset>.md` and the SVG
//! eval-loss curves from whatever has finished, listing what has not.

use std::path::PathBuf;

use burn_peft_examples::quality::{self, Phase, Preset};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum PhaseArg {
    Sweep,
    Study,
}

#[derive(Subcommand)]
enum Command {
    /// Write the run files and the plan of one phase; print the plan file.
    Plan {
        #[arg(long)]
        preset: String,
        #[arg(long, value_enum)]
        phase: PhaseArg,
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        data: PathBuf,
    },
    /// Write the report (`<preset>.md` and SVGs) into `out_dir`; print the Markdown file.
    Report {
        #[arg(long)]
        preset: String,
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        out_dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Plan {
            preset,
            phase,
            root,
            data,
        } => {
            let phase = match phase {
                PhaseArg::Sweep => Phase::Sweep,
                PhaseArg::Study => Phase::Study,
            };
            let file = quality::plan(&Preset::named(&preset)?, &root, &data, phase)?;
            println!("{}", file.display());
        }
        Command::Report {
            preset,
            root,
            out_dir,
        } => {
            let file = quality::report(&Preset::named(&preset)?, &root, &out_dir)?;
            println!("{}", file.display());
        }
    }
    Ok(())
}
