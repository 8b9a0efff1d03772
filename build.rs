//! Makes the README's `rust,ignore` snippets compile as doctests.
//!
//! Those snippets are fragments: they use `?` and `.await` at the top level
//! and stand-in names (`hyper_client`, `your_routes`, …) for what the reader
//! brings. This script wraps each one, unchanged, in an async function that
//! defines the stand-ins it names, and writes them to
//! `$OUT_DIR/readme_snippets.md`; `src/lib.rs` includes that file as a
//! doc comment under `cfg(doctest)` with every feature on. A README edit
//! that no longer compiles against the API then fails `cargo test --doc`.
//!
//! It never fails the build: without a README it writes nothing to test.

use std::fmt::Write as _;
use std::path::PathBuf;

/// The README's stand-in names and what each is defined as (hidden lines).
const STAND_INS: &[(&str, &str)] = &[
    (
        "hyper_client",
        "let hyper_client = tower::service_fn(|_: http::Request<http_body_util::Full<bytes::Bytes>>| async { \
         Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::<bytes::Bytes>::default())) });",
    ),
    (
        "http_client",
        "let http_client = tower::service_fn(|_: http::Request<tower_firebreak::retry::ReplayBody<http_body_util::Full<bytes::Bytes>>>| async { \
         Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::<bytes::Bytes>::default())) });",
    ),
    (
        "your_routes",
        "let your_routes: axum::Router = axum::Router::new();",
    ),
    (
        "your_auth_layer",
        "let your_auth_layer = tower::layer::util::Identity::new();",
    ),
];

fn main() {
    // A missing path would count as changed, and rebuild every time.
    if std::path::Path::new("README.md").exists() {
        println!("cargo::rerun-if-changed=README.md");
    }
    println!("cargo::rerun-if-changed=build.rs");
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        return;
    };
    let readme = std::fs::read_to_string("README.md").unwrap_or_default();
    // Best effort: a build that cannot write here has bigger problems, and
    // only the doctests read the file.
    let _ = std::fs::write(out.join("readme_snippets.md"), snippets(&readme));
}

/// Every `rust,ignore` block of `readme`, as a compiled doctest.
fn snippets(readme: &str) -> String {
    let mut doc = String::new();
    let mut block: Option<Vec<&str>> = None;
    for line in readme.lines() {
        match &mut block {
            None if line.trim_end() == "```rust,ignore" => block = Some(Vec::new()),
            Some(lines) if line.trim_end() == "```" => {
                wrap(&mut doc, lines);
                block = None;
            }
            Some(lines) => lines.push(line),
            None => {}
        }
    }
    doc
}

fn wrap(doc: &mut String, lines: &[&str]) {
    doc.push_str("```rust,no_run\n# #![allow(unused)]\n");
    doc.push_str(
        "# async fn snippet() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {\n",
    );
    for (name, definition) in STAND_INS {
        if lines.iter().any(|l| names(l, name)) {
            let _ = writeln!(doc, "# {definition}");
        }
    }
    for line in lines {
        let _ = writeln!(doc, "{line}");
    }
    doc.push_str("# Ok(())\n# }\n# fn main() {}\n```\n\n");
}

/// Whether `line` uses the identifier `name` (not as part of a longer one).
fn names(line: &str, name: &str) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    line.match_indices(name).any(|(i, _)| {
        let before = line[..i].chars().next_back();
        let after = line[i + name.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}
