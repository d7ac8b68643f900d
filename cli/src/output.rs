//! `-o table|json|yaml` for every `show`.

use anyhow::{Context, Result};
use clap::ValueEnum;
use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
}

/// Something printable as a table as well as serialized.
pub trait Tabular: Serialize {
    fn header() -> Vec<&'static str>;
    fn row(&self) -> Vec<String>;
}

/// One value as JSON or YAML (a table takes [`render`]; here it is JSON).
pub fn serialize<T: Serialize>(value: &T, format: Format) -> Result<String> {
    Ok(match format {
        Format::Yaml => serde_saphyr::to_string(value).context("Failed to encode YAML")?,
        Format::Json | Format::Table => {
            serde_json::to_string_pretty(value).context("Failed to encode JSON")? + "\n"
        }
    })
}

pub fn render<T: Tabular>(items: &[T], format: Format) -> Result<String> {
    Ok(match format {
        Format::Json | Format::Yaml => serialize(&items, format)?,
        Format::Table => {
            let mut t = comfy_table::Table::new();
            t.load_style(comfy_table::presets::NOTHING);
            t.set_header(T::header());
            for i in items {
                t.add_row(i.row());
            }
            t.to_string() + "\n"
        }
    })
}

/// Writes `s` to stdout. When the reader has gone (`clusterlink lab status | head`), the
/// command ends quietly with success, as `cat` would under SIGPIPE, instead of panicking.
pub fn print(s: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        // Nowhere left to say it but stderr; the command's result stands.
        Err(e) => tracing::warn!(error = %e, "cannot write to stdout"),
    }
}
