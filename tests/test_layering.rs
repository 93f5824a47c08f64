//! The module layering, checked from the source: the version-control core (store, history,
//! tasks, metrics) never imports the ML engine, the workflow or the CLI, and never prints; and
//! ARCHITECTURE.md's dependency diagram lists exactly the edges the `use crate::…` paths make.
//!
//! The scanner is a small lexer, not a Rust parser: comments, strings and character literals
//! are blanked out first, then `crate::` paths (also `crate::{a, b}` groups, `$crate::`) and
//! `super::` chains that climb to the crate root are resolved to top-level modules.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The core modules and what they may not import.
const CORE: [&str; 4] = ["store", "history", "tasks", "metrics"];
const FORBIDDEN: [&str; 3] = ["ml", "workflow", "cli"];

/// Replace comments, string literals and character literals by spaces (newlines are kept, so
/// line numbers stay right).
fn blank_comments_and_literals(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out: Vec<char> = Vec::with_capacity(c.len());
    let blank = |out: &mut Vec<char>, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = 0;
    while i < c.len() {
        let at = |k: usize| c.get(i + k).copied().unwrap_or('\0');
        if at(0) == '/' && at(1) == '/' {
            while i < c.len() && c[i] != '\n' {
                blank(&mut out, c[i]);
                i += 1;
            }
        } else if at(0) == '/' && at(1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.extend([' ', ' ']);
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.extend([' ', ' ']);
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
        } else if (at(0) == 'r' || (at(0) == 'b' && at(1) == 'r'))
            && (i == 0 || !ident(c[i - 1]))
            && {
                let s = if at(0) == 'b' { 2 } else { 1 };
                let mut k = s;
                while at(k) == '#' {
                    k += 1;
                }
                at(k) == '"'
            }
        {
            // A raw string r#"…"#: ends at a quote followed by as many hashes.
            let s = if at(0) == 'b' { 2 } else { 1 };
            let mut hashes = 0;
            while at(s + hashes) == '#' {
                hashes += 1;
            }
            let open = s + hashes + 1;
            out.extend(std::iter::repeat_n(' ', open));
            i += open;
            while i < c.len() {
                if c[i] == '"' && (1..=hashes).all(|h| c.get(i + h) == Some(&'#')) {
                    out.extend(std::iter::repeat_n(' ', hashes + 1));
                    i += hashes + 1;
                    break;
                }
                blank(&mut out, c[i]);
                i += 1;
            }
        } else if at(0) == '"' {
            out.push(' ');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    blank(&mut out, c[i]);
                    i += 1;
                }
                if i < c.len() {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if at(0) == '\'' && (at(1) == '\\' || (at(1) != '\0' && at(2) == '\'')) {
            // A character literal ('x', '\n', '\u{1b}', '\''); a lifetime ('a) stays.
            out.push(' ');
            i += 1;
            if c[i] == '\\' {
                out.extend([' ', ' ']);
                i += 2;
            }
            while i < c.len() && c[i] != '\'' {
                blank(&mut out, c[i]);
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else {
            out.push(at(0));
            i += 1;
        }
    }
    out.into_iter().collect()
}

/// A token of blanked code: an identifier or one punctuation character, with its line.
#[derive(Clone, Debug, PartialEq)]
struct Tok {
    text: String,
    line: usize,
}

fn tokens(code: &str) -> Vec<Tok> {
    let mut out = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let c: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < c.len() {
            if c[i].is_alphanumeric() || c[i] == '_' {
                let start = i;
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
                out.push(Tok {
                    text: c[start..i].iter().collect(),
                    line: n + 1,
                });
            } else if c[i] == ':' && c.get(i + 1) == Some(&':') {
                out.push(Tok {
                    text: "::".into(),
                    line: n + 1,
                });
                i += 2;
            } else {
                if !c[i].is_whitespace() {
                    out.push(Tok {
                        text: c[i].to_string(),
                        line: n + 1,
                    });
                }
                i += 1;
            }
        }
    }
    out
}

/// The top-level names a path reaches at the crate root, starting at token `i` (just after
/// `crate::` or the last `super::`): one name, or the names of a `{a, b::c}` group.
fn root_names(t: &[Tok], i: usize) -> Vec<(usize, String)> {
    match t.get(i) {
        Some(tok) if tok.text == "{" => {
            let mut names = Vec::new();
            let mut depth = 0;
            let mut expect_name = true;
            for tok in &t[i..] {
                match tok.text.as_str() {
                    "{" => {
                        depth += 1;
                        if depth > 1 {
                            expect_name = false;
                        }
                    }
                    "}" => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    "," if depth == 1 => expect_name = true,
                    name if depth == 1 && expect_name => {
                        names.push((tok.line, name.to_string()));
                        expect_name = false;
                    }
                    _ => {}
                }
            }
            names
        }
        Some(tok) => vec![(tok.line, tok.text.clone())],
        None => Vec::new(),
    }
}

/// Every reference to a crate-root item in `code` (blanked), as (line, name). `depth` is the
/// module depth of the file (src/tasks/mod.rs: 1, src/tasks/judge/mod.rs: 2); inline `mod x {`
/// blocks add to it, for `super::` chains.
fn root_references(code: &str, depth: usize) -> Vec<(usize, String)> {
    let t = tokens(code);
    let mut out = Vec::new();
    let mut braces = 0usize;
    let mut inline_mods: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < t.len() {
        let text = t[i].text.as_str();
        let next = |k: usize| t.get(i + k).map(|x| x.text.as_str());
        match text {
            "{" => braces += 1,
            "}" => {
                braces = braces.saturating_sub(1);
                if inline_mods.last() == Some(&braces) {
                    inline_mods.pop();
                }
            }
            "mod" if next(2) == Some("{") => {
                inline_mods.push(braces);
            }
            "crate" if next(1) == Some("::") => {
                out.extend(root_names(&t, i + 2));
            }
            "super" if i == 0 || t[i - 1].text != "::" => {
                let mut k = i;
                let mut ups = 0;
                while t.get(k).is_some_and(|x| x.text == "super")
                    && t.get(k + 1).is_some_and(|x| x.text == "::")
                {
                    ups += 1;
                    k += 2;
                }
                if ups > 0 && ups >= depth + inline_mods.len() {
                    out.extend(root_names(&t, k));
                }
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// Printing in `code` (blanked): the print macros, `dbg!`, and the standard streams
/// (`std::io::stdout()`, `io::stderr`, `use std::io::{stdout}`, `Stdout`…), as (line, what).
/// Fields and methods named `stdout` (`output.stdout`, `Command::stdout(…)`) are not printing.
fn printing(code: &str) -> Vec<(usize, String)> {
    let t = tokens(code);
    let mut out = Vec::new();
    let mut in_use = false;
    for (i, tok) in t.iter().enumerate() {
        let prev = i.checked_sub(1).map(|p| t[p].text.as_str());
        let next = |k: usize| t.get(i + k).map(|x| x.text.as_str());
        match tok.text.as_str() {
            "use" => in_use = true,
            ";" => in_use = false,
            "println" | "print" | "eprintln" | "eprint" | "dbg"
                if next(1) == Some("!") && matches!(next(2), Some("(" | "[" | "{")) =>
            {
                out.push((tok.line, format!("{}!", tok.text)));
            }
            "stdout" | "stderr" | "Stdout" | "Stderr" | "StdoutLock" | "StderrLock"
                if prev != Some(".") && (in_use || prev == Some("::") || next(1) == Some("(")) =>
            {
                out.push((tok.line, tok.text.clone()));
            }
            _ => {}
        }
    }
    out
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level modules, from src/lib.rs.
fn top_modules() -> Vec<String> {
    let lib = std::fs::read_to_string(src_dir().join("lib.rs")).unwrap();
    let code = blank_comments_and_literals(&lib);
    let t = tokens(&code);
    t.windows(3)
        .filter(|w| w[0].text == "mod" && w[2].text == ";")
        .map(|w| w[1].text.clone())
        .collect()
}

/// Every .rs file of a top-level module, with its module depth.
fn module_files(module: &str) -> Vec<(PathBuf, usize)> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<(PathBuf, usize)>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, depth + 1, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let own = p.file_name().is_some_and(|n| n != "mod.rs");
                out.push((p, depth + usize::from(own)));
            }
        }
    }
    let dir = src_dir().join(module);
    let mut out = Vec::new();
    if dir.is_dir() {
        walk(&dir, 1, &mut out);
    }
    let file = src_dir().join(format!("{module}.rs"));
    if file.is_file() {
        out.push((file, 1));
    }
    out
}

fn rel(p: &Path) -> String {
    p.strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")))
        .unwrap_or(p)
        .display()
        .to_string()
}

/// The violations of the core rule in one file's source.
fn core_violations(file: &str, src: &str, depth: usize) -> Vec<String> {
    let code = blank_comments_and_literals(src);
    let mut out = Vec::new();
    for (line, name) in root_references(&code, depth) {
        if FORBIDDEN.contains(&name.as_str()) {
            out.push(format!("{file}:{line}: imports crate::{name}"));
        }
    }
    for (line, what) in printing(&code) {
        out.push(format!("{file}:{line}: prints ({what})"));
    }
    out
}

/// module → the other top-level modules it references.
fn derived_edges() -> BTreeMap<String, BTreeSet<String>> {
    let modules = top_modules();
    let mut edges = BTreeMap::new();
    for m in &modules {
        let mut deps = BTreeSet::new();
        for (path, depth) in module_files(m) {
            let code = blank_comments_and_literals(&std::fs::read_to_string(&path).unwrap());
            for (_, name) in root_references(&code, depth) {
                if name != *m && modules.contains(&name) {
                    deps.insert(name);
                }
            }
        }
        edges.insert(m.clone(), deps);
    }
    edges
}

/// The diagram of ARCHITECTURE.md: the first ```text block, lines `module ──► a, b` or
/// `module (imports no other module)`, in layer order.
fn diagram(text: &str, modules: &[String]) -> Vec<(String, BTreeSet<String>)> {
    let block = text
        .split("```text\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .unwrap_or("");
    let mut out = Vec::new();
    for line in block.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if !modules.iter().any(|m| m == name) {
            continue;
        }
        let deps = match line.split_once('►') {
            Some((_, rest)) => rest
                .split(',')
                .map(|d| d.split_whitespace().next().unwrap_or("").to_string())
                .filter(|d| !d.is_empty())
                .collect(),
            None => BTreeSet::new(),
        };
        out.push((name.to_string(), deps));
    }
    out
}

#[test]
fn core_modules_never_import_the_engine_or_the_cli_and_never_print() {
    let mut violations = Vec::new();
    let mut files = 0;
    for m in CORE {
        for (path, depth) in module_files(m) {
            files += 1;
            let src = std::fs::read_to_string(&path).unwrap();
            violations.extend(core_violations(&rel(&path), &src, depth));
        }
    }
    assert!(files > 20, "only {files} core files found under src/");
    assert!(
        violations.is_empty(),
        "the core (store, history, tasks, metrics) may not import ml, workflow or cli, nor \
         print (it returns data and errors; src/cli prints):\n  {}",
        violations.join("\n  ")
    );
}

#[test]
fn the_scanner_catches_planted_violations() {
    let planted = r#"
use crate::ml::llava::load_model;
use crate::{store::Store, workflow};
use super::super::cli::Ui;
pub fn f() {
    let x = crate::tasks::formats::Qid("a".into());
    println!("{x:?}");
    eprint!("x");
    let _ = dbg!(1);
    std::io::stdout().flush();
    let _ = io::stderr();
}
"#;
    let v = core_violations("src/tasks/x.rs", planted, 2);
    assert_eq!(
        v,
        [
            "src/tasks/x.rs:2: imports crate::ml",
            "src/tasks/x.rs:3: imports crate::workflow",
            "src/tasks/x.rs:4: imports crate::cli",
            "src/tasks/x.rs:7: prints (println!)",
            "src/tasks/x.rs:8: prints (eprint!)",
            "src/tasks/x.rs:9: prints (dbg!)",
            "src/tasks/x.rs:10: prints (stdout)",
            "src/tasks/x.rs:11: prints (stderr)",
        ]
    );
    // What looks like a violation but is not: comments, strings, fields, methods, a `super::`
    // that stays inside the module, a lifetime next to a char literal.
    let clean = r##"
// use crate::ml; println!("x");
/* crate::cli /* nested */ crate::workflow */
/// Calls `crate::ml::x` and println!.
fn g<'a>(o: &'a Output) -> &'a str {
    let s = "crate::ml::x println!(\"\")";
    let r = r#"crate::cli " println!()"#;
    let c = '"'; let d = '\'';
    let _ = (s, r, c, d, o.stdout.len(), Command::new("git").stdout(Stdio::null()));
    super::formats::read_test_file
}
struct Output { stdout: String }
"##;
    assert_eq!(
        core_violations("src/tasks/y.rs", clean, 2),
        Vec::<String>::new()
    );
    // super:: chains resolve against the file's depth and inline modules.
    let code = blank_comments_and_literals(
        "use super::ml;\nmod tests { use super::super::cli; use super::x; }\n",
    );
    assert_eq!(
        root_references(&code, 1),
        [(1, "ml".to_string()), (2, "cli".to_string())]
    );
    assert_eq!(root_references(&code, 2), []);
    // $crate in macros and nested groups.
    let code = blank_comments_and_literals("$crate::store::x; use crate::{tasks::{a, b}, ml};");
    let names: Vec<String> = root_references(&code, 1).into_iter().map(|x| x.1).collect();
    assert_eq!(names, ["store", "tasks", "ml"]);
}

#[test]
fn architecture_diagram_lists_exactly_the_real_edges() {
    let modules = top_modules();
    assert!(modules.len() >= 7, "{modules:?}");
    let derived = derived_edges();
    // The rule the diagram illustrates holds in the derived graph too.
    for m in CORE {
        for f in FORBIDDEN {
            assert!(!derived[m].contains(f), "{m} imports {f}");
        }
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md");
    let listed = diagram(&std::fs::read_to_string(&path).unwrap(), &modules);
    let mut problems = Vec::new();
    let names: Vec<&String> = listed.iter().map(|(m, _)| m).collect();
    for m in &modules {
        if !names.contains(&m) {
            problems.push(format!("module {m} is missing from the diagram"));
        }
    }
    for (i, (m, deps)) in listed.iter().enumerate() {
        let real = &derived[m];
        for d in real.difference(deps) {
            problems.push(format!("{m} ──► {d} is in the code but not in the diagram"));
        }
        for d in deps.difference(real) {
            problems.push(format!("{m} ──► {d} is in the diagram but not in the code"));
        }
        // Layers: every edge points down the list (no cycles, no upward import).
        for d in deps {
            if !names[i + 1..].contains(&d) {
                problems.push(format!("{m} ──► {d} points up: list {d} below {m}"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "ARCHITECTURE.md's module diagram (the first ```text block) is out of date:\n  {}\n\
         The edges in the code are:\n  {}",
        problems.join("\n  "),
        derived
            .iter()
            .map(|(m, d)| format!(
                "{m} ──► {}",
                d.iter().cloned().collect::<Vec<_>>().join(", ")
            ))
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

#[test]
fn the_diagram_parser_reads_edges_and_leaves() {
    let modules: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    let text = "intro\n```text\na ──► b, c     what a does\nb ─► c\nc (imports no other module)\nzz ──► a\n```\n```text\nb ──► a\n```";
    let d = diagram(text, &modules);
    let want = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        d,
        vec![
            ("a".to_string(), want(&["b", "c"])),
            ("b".to_string(), want(&["c"])),
            ("c".to_string(), want(&[])),
        ]
    );
}
