use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::tasks::mini::{self, MiniConfig};

/// Generate a benchmark's data (CoIN-mini: eight small CoIN-shaped tasks)
///
/// Same seed, same bytes. The folder mirrors CoIN's layout (Instructions_Original/<Task>/,
/// cl_dataset/ with images and annotation files); register it with
/// `coin task add --coin-mini DIR`. See docs/coin-mini.md.
#[derive(clap::Args, Debug)]
pub struct BenchDataArgs {
    /// Which benchmark (only `coin-mini`)
    #[arg(value_enum)]
    pub bench: Bench,
    /// The folder to write (created; must be empty or absent)
    #[arg(long)]
    pub out: PathBuf,
    /// The random seed
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Training items per task
    #[arg(long, default_value_t = 200)]
    pub train: usize,
    /// Test items per task
    #[arg(long, default_value_t = 50)]
    pub test: usize,
    /// Image width and height in pixels (at least 32)
    #[arg(long, default_value_t = 32)]
    pub image_size: u32,
    /// Print the manifest as JSON
    #[arg(long)]
    pub json: bool,
}

/// Benchmarks coin can generate.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Bench {
    /// Eight small tasks mirroring CoIN's, learnable by a tiny model on a CPU
    CoinMini,
}

pub fn cmd_bench_data(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &BenchDataArgs,
) -> Result<(), CommandError> {
    let out = helper.cwd.join(&args.out);
    if out.exists() {
        let non_empty = std::fs::read_dir(&out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true);
        if non_empty {
            return Err(CommandError::user(format!(
                "'{}' exists and is not empty",
                args.out.display()
            ))
            .hint("Pick a new folder, or remove this one."));
        }
    }
    let cfg = MiniConfig {
        seed: args.seed,
        train: args.train,
        test: args.test,
        image_size: args.image_size,
    };
    let start = Instant::now();
    let manifest = mini::generate(&out, &cfg, |task| ui.status(&format!("Generating {task}.")))?;
    let secs = start.elapsed().as_secs_f64();
    if args.json {
        return ui.json(&manifest);
    }
    let o = ui.out();
    writeln!(
        o,
        "{:<15}  {:<9}  {:>5}  {:>4}  {:>6}",
        "task", "scorer", "train", "test", "chance"
    )?;
    for t in &manifest.tasks {
        writeln!(
            o,
            "{:<15}  {:<9}  {:>5}  {:>4}  {:>5.1}%",
            t.name,
            t.scorer,
            t.n_train,
            t.n_test,
            100.0 * t.chance
        )?;
    }
    ui.status(&format!(
        "Wrote CoIN-mini (seed {}) to {} in {secs:.1} s.",
        args.seed,
        args.out.display()
    ));
    Ok(())
}
