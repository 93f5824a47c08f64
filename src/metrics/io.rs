//! Reading accuracy matrices made elsewhere: CSV and JSON.

use super::AccuracyMatrix;

/// Why a matrix file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MatrixFileError {
    /// The CSV is malformed.
    #[error("could not parse the CSV")]
    Csv(#[from] csv::Error),
    /// The JSON is malformed or has the wrong shape.
    #[error(
        "could not parse the JSON (expected {{\"tasks\": [...], \"matrix\": [[score or null]]}})"
    )]
    Json(#[from] serde_json::Error),
    /// A cell is not a number.
    #[error("row {row}, column '{column}': '{value}' is not a number (leave the cell empty when there is no score)")]
    Cell {
        /// 1-based data row.
        row: usize,
        /// The column's header.
        column: String,
        /// The text found.
        value: String,
    },
    /// The file has no header or no task column.
    #[error("the CSV needs a header row naming the tasks, one column per task")]
    NoHeader,
}

const ZERO_SHOT_LABELS: &[&str] = &["zero-shot", "zero_shot", "zeroshot", "base"];
const LABEL_HEADERS: &[&str] = &["", "step", "checkpoint", "after", "stage", "row", "trained"];

/// Parse a CSV matrix: a header naming the tasks, then one row per training step.
///
/// If the first header cell is empty or one of `step`, `checkpoint`, `after`, `stage`,
/// `row`, `trained`, the first column holds row labels; a row labelled `zero-shot` (or
/// `base`) is the zero-shot row and may stand anywhere. Empty cells are missing scores.
pub fn parse_matrix_csv(text: &str) -> Result<AccuracyMatrix, MatrixFileError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = reader.headers()?.clone();
    if headers.is_empty() {
        return Err(MatrixFileError::NoHeader);
    }
    let first = headers.get(0).unwrap_or("").to_ascii_lowercase();
    let labelled = LABEL_HEADERS.contains(&first.as_str());
    let skip = usize::from(labelled);
    let tasks: Vec<String> = headers.iter().skip(skip).map(str::to_string).collect();
    if tasks.is_empty() {
        return Err(MatrixFileError::NoHeader);
    }
    let mut rows = Vec::new();
    let mut zero_shot = None;
    for (i, record) in reader.records().enumerate() {
        let record = record?;
        let label = if labelled {
            record.get(0).unwrap_or("")
        } else {
            ""
        };
        let mut cells = Vec::with_capacity(tasks.len());
        for (c, value) in record.iter().skip(skip).enumerate() {
            if value.is_empty() || value.eq_ignore_ascii_case("null") || value == "-" {
                cells.push(None);
            } else {
                let v: f64 = value.parse().map_err(|_| MatrixFileError::Cell {
                    row: i + 1,
                    column: tasks.get(c).cloned().unwrap_or_default(),
                    value: value.to_string(),
                })?;
                cells.push(Some(v));
            }
        }
        if ZERO_SHOT_LABELS.contains(&label.to_ascii_lowercase().as_str()) {
            zero_shot = Some(cells);
        } else {
            rows.push(cells);
        }
    }
    Ok(AccuracyMatrix {
        tasks,
        rows,
        zero_shot,
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MatrixJson {
    tasks: Vec<String>,
    matrix: Vec<Vec<Option<f64>>>,
    #[serde(default, alias = "zero-shot")]
    zero_shot: Option<Vec<Option<f64>>>,
    // Accepted so that `coin matrix --json` output reads back.
    #[serde(default)]
    #[allow(dead_code)]
    checkpoints: Option<serde_json::Value>,
    #[serde(default)]
    #[allow(dead_code)]
    metrics: Option<serde_json::Value>,
}

/// Parse a JSON matrix `{"tasks": [...], "matrix": [[score or null]], "zero_shot": [...]?}`.
/// The output of `coin matrix --json` is accepted as it is.
pub fn parse_matrix_json(text: &str) -> Result<AccuracyMatrix, MatrixFileError> {
    let m: MatrixJson = serde_json::from_str(text)?;
    Ok(AccuracyMatrix {
        tasks: m.tasks,
        rows: m.matrix,
        zero_shot: m.zero_shot,
    })
}
