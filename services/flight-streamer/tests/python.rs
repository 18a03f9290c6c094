//! `examples/python/flight_pandas.py` against a flight-streamer started here: pyarrow reads the
//! events into pandas and an export into polars, with real column types.

mod common;

use chrono::Utc;
use common::{Stack, TOKEN};
use herald_test_support::workspace_root;

#[tokio::test]
async fn the_pandas_example_reads_typed_events_and_a_polars_export() {
    let python = workspace_root().join(".venv/bin/python");
    let probe = std::process::Command::new(&python)
        .args(["-c", "import pyarrow.flight, pandas, polars"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "SKIPPED: {} cannot import pyarrow, pandas and polars; run scripts/install-deps",
            python.display()
        );
        return;
    }
    let stack = Stack::start().await;
    for i in 0..25 {
        let order = stack.new_order(&format!("{i}.75"), "new", Utc::now()).await;
        stack.publish(&order).await;
    }
    let output = tokio::process::Command::new(&python)
        .arg(workspace_root().join("examples/python/flight_pandas.py"))
        .args(["--url", &format!("grpc://{}", stack.address)])
        .args(["--token", TOKEN, "--json"])
        .output()
        .await
        .expect("run the example");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the example failed: {stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(summary["events"], 25, "{summary}");
    assert_eq!(
        summary["cursor"], 25,
        "the cursor is the last stream sequence"
    );
    assert_eq!(summary["export_rows"], 25);
    assert_eq!(summary["flights"].as_array().map(Vec::len), Some(6));
    let events = &summary["event_dtypes"];
    for (column, dtype) in [
        ("row_id", "int64"),
        ("customer_id", "int64"),
        ("total", "float64"),
        ("tx", "int64"),
        ("seq", "uint64"),
        ("at", "datetime64[us, UTC]"),
        ("created_at", "datetime64[us, UTC]"),
    ] {
        assert_eq!(events[column], dtype, "pandas dtype of {column}: {events}");
    }
    let export = &summary["export_dtypes"];
    assert_eq!(export["id"], "Int64", "{export}");
    assert_eq!(export["total"], "Float64");
    assert_eq!(
        export["created_at"],
        "Datetime(time_unit='us', time_zone='UTC')"
    );
}
