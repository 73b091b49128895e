//! The workspace's `unsafe` boundary (`docs/architecture.md`, "Where `unsafe` lives"): the
//! keyword `unsafe` appears only in the kernel crates (peft-kernels in `kernels/`,
//! sparse-kernels), no `#[path = ...]` attribute points outside its own crate, and every other
//! crate's `src/lib.rs` and `src/main.rs` start with `#![forbid(unsafe_code)]`.
//!
//! The checker reads the repository's `.rs` files and `Cargo.toml`s; its own tests run it on
//! small synthetic trees to show that it catches each kind of violation.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// The packages allowed to contain `unsafe`.
const KERNEL_CRATES: [&str; 2] = ["peft-kernels", "sparse-kernels"];

/// A source tree: each file's path relative to the repository root, and its text.
type Tree = BTreeMap<PathBuf, String>;

/// `src` with its comments removed; string and character literals are kept with
/// `keep_literals`, else each becomes an empty `""`.
fn strip(src: &str, keep_literals: bool) -> String {
    let c: Vec<char> = src.chars().collect();
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < c.len() {
        let at = |j: usize| c.get(j).copied().unwrap_or('\0');
        if c[i] == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c[i] == 'r'
            && (i == 0 || !ident(c[i - 1]) || (c[i - 1] == 'b' && (i < 2 || !ident(c[i - 2]))))
            && matches!(at(i + 1), '"' | '#')
            && {
                let hashes = c[i + 1..].iter().take_while(|ch| **ch == '#').count();
                at(i + 1 + hashes) == '"'
            }
        {
            // A raw string: `r"…"`, `r#"…"#`, … (also after `b`).
            let start = i;
            let hashes = c[i + 1..].iter().take_while(|ch| **ch == '#').count();
            i += 2 + hashes;
            loop {
                if i >= c.len() {
                    break;
                }
                if c[i] == '"'
                    && c[i + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|ch| **ch == '#')
                        .count()
                        == hashes
                {
                    i += 1 + hashes;
                    break;
                }
                i += 1;
            }
            if keep_literals {
                out.extend(&c[start..i]);
            } else {
                out.push_str("\"\"");
            }
        } else if c[i] == '"' {
            let start = i;
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            if keep_literals {
                out.extend(&c[start..i.min(c.len())]);
            } else {
                out.push_str("\"\"");
            }
        } else if c[i] == '\'' && (at(i + 1) == '\\' || (at(i + 1) != '\'' && at(i + 2) == '\'')) {
            // A character literal (a lifetime has no closing quote two characters on).
            let start = i;
            i += 1;
            while i < c.len() && c[i] != '\'' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            if keep_literals {
                out.extend(&c[start..i.min(c.len())]);
            } else {
                out.push_str("' '");
            }
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// Whether the code (comments and literals stripped) uses the keyword `unsafe`.
fn uses_unsafe(code: &str) -> bool {
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    code.match_indices("unsafe").any(|(at, word)| {
        let before = code[..at].chars().next_back();
        let after = code[at + word.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

/// The targets of the `#[path = "…"]` attributes in the code (comments stripped).
fn path_attributes(code: &str) -> Vec<String> {
    let pattern = regex::Regex::new(r#"#\s*\[\s*path\s*=\s*"([^"]*)"\s*\]"#).unwrap();
    pattern
        .captures_iter(code)
        .map(|c| c[1].to_string())
        .collect()
}

/// `path` with `.` and `..` resolved lexically.
fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// The package name a `Cargo.toml` declares, if it has a `[package]` section.
fn package_name(manifest: &str) -> Option<String> {
    let mut in_package = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package && let Some(value) = line.strip_prefix("name") {
            let value = value.trim_start().strip_prefix('=')?.trim();
            return Some(value.trim_matches('"').to_string());
        }
    }
    None
}

/// Every violation of the boundary in `tree`, one line each.
fn violations(tree: &Tree) -> Vec<String> {
    // Package roots (directories of a `Cargo.toml` with a `[package]`) and their names.
    let packages: BTreeMap<PathBuf, String> = tree
        .iter()
        .filter(|(path, _)| path.file_name().is_some_and(|n| n == "Cargo.toml"))
        .filter_map(|(path, text)| {
            let root = path.parent().unwrap_or(Path::new("")).to_path_buf();
            package_name(text).map(|name| (root, name))
        })
        .collect();
    let owner = |file: &Path| {
        packages
            .iter()
            .filter(|(root, _)| file.starts_with(root))
            .max_by_key(|(root, _)| root.components().count())
    };
    let mut found = Vec::new();
    for (path, text) in tree {
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let Some((root, name)) = owner(path) else {
            found.push(format!("{}: belongs to no package", path.display()));
            continue;
        };
        let kernel = KERNEL_CRATES.contains(&name.as_str());
        if !kernel && uses_unsafe(&strip(text, false)) {
            found.push(format!(
                "{}: `unsafe` outside the kernel crates ({name})",
                path.display()
            ));
        }
        let dir = path.parent().unwrap_or(Path::new(""));
        for target in path_attributes(&strip(text, true)) {
            let resolved = normalise(&dir.join(&target));
            if !resolved.starts_with(root) {
                found.push(format!(
                    "{}: #[path = \"{target}\"] leaves its crate ({name}, {})",
                    path.display(),
                    root.display()
                ));
            }
        }
        let crate_root = ["src/lib.rs", "src/main.rs"]
            .iter()
            .any(|r| *path == root.join(r));
        if !kernel && crate_root && !strip(text, false).contains("#![forbid(unsafe_code)]") {
            found.push(format!(
                "{}: no #![forbid(unsafe_code)] ({name} is not a kernel crate)",
                path.display()
            ));
        }
    }
    found
}

/// The repository's `.rs` files and `Cargo.toml`s (build output and hidden folders skipped).
fn repository() -> Tree {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut tree = Tree::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(root.join(&dir)).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = dir.join(&name);
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                if !name.starts_with('.') && name != "target" {
                    pending.push(rel);
                }
            } else if name.ends_with(".rs") || name == "Cargo.toml" {
                tree.insert(rel, std::fs::read_to_string(entry.path()).unwrap());
            }
        }
    }
    tree
}

#[test]
fn unsafe_lives_only_in_the_kernel_crates() {
    let tree = repository();
    let found = violations(&tree);
    assert!(
        found.is_empty(),
        "unsafe boundary violations:\n{}",
        found.join("\n")
    );
    // The walk saw the workspace: both kernel crates and the crates that must forbid unsafe.
    let has = |p: &str| tree.contains_key(Path::new(p));
    assert!(has("kernels/Cargo.toml") && has("crates/sparse-kernels/src/lib.rs"));
    assert!(has("crates/peft-core/src/lib.rs") && has("crates/peft-models/src/lib.rs"));
    // And the kernel crates do use `unsafe` (the checker would see it).
    assert!(uses_unsafe(&strip(
        &tree[Path::new("kernels/src/mmap.rs")],
        false
    )));
}

/// A tree of two packages, `kernels/` (peft-kernels) and `crates/app` (app), plus `files`.
fn synthetic(files: &[(&str, &str)]) -> Tree {
    let mut tree = Tree::new();
    let manifest = |name: &str| format!("[package]\nname = \"{name}\"\nversion = \"0.1.0\"\n");
    tree.insert("Cargo.toml".into(), "[workspace]\nmembers = []\n".into());
    tree.insert("kernels/Cargo.toml".into(), manifest("peft-kernels"));
    tree.insert("crates/app/Cargo.toml".into(), manifest("app"));
    tree.insert(
        "crates/app/src/lib.rs".into(),
        "//! App.\n#![forbid(unsafe_code)]\npub mod a;\n".into(),
    );
    tree.insert("kernels/src/lib.rs".into(), "pub mod k;\n".into());
    for (path, text) in files {
        tree.insert(path.into(), text.to_string());
    }
    tree
}

#[test]
fn the_checker_accepts_unsafe_in_kernel_crates_and_the_word_elsewhere() {
    let clean = synthetic(&[
        (
            "kernels/src/k.rs",
            "pub fn f(v: &mut Vec<u8>) { unsafe { v.set_len(0) } }\n",
        ),
        (
            "crates/app/src/a.rs",
            concat!(
                "//! Calls no unsafe code; `unsafe` in docs is fine.\n",
                "/* an unsafe /* nested */ block comment */\n",
                "#[deny(unsafe_code)]\n",
                "pub fn f<'a>(s: &'a str) -> (&'a str, char, &'static str, &'static str) {\n",
                "    (s, '\\'', \"unsafe { }\", r#\"an \"unsafe\" raw string\"#)\n",
                "}\n",
                "#[path = \"inner/b.rs\"]\nmod b;\n",
            ),
        ),
    ]);
    assert_eq!(violations(&clean), Vec::<String>::new());
}

#[test]
fn the_checker_catches_unsafe_outside_the_kernel_crates() {
    for code in [
        "pub fn f(v: &mut Vec<u8>) { unsafe { v.set_len(0) } }",
        "pub unsafe fn f() {}",
        "unsafe impl Send for X {}",
        "fn g<'a>(x: &'a u8) -> char { let _ = x; unsafe { h() }; 'c' }",
    ] {
        let tree = synthetic(&[("crates/app/src/a.rs", code)]);
        let found = violations(&tree);
        assert_eq!(found.len(), 1, "{code}: {found:?}");
        assert!(found[0].contains("crates/app/src/a.rs") && found[0].contains("`unsafe`"));
    }
    // A test or example file of a non-kernel package counts too.
    let tree = synthetic(&[("crates/app/tests/t.rs", "#[test] fn t() { unsafe {} }")]);
    assert_eq!(violations(&tree).len(), 1);
}

#[test]
fn the_checker_catches_a_path_attribute_leaving_its_crate() {
    let tree = synthetic(&[(
        "crates/app/src/a.rs",
        "#[path = \"../../../kernels/src/k.rs\"]\nmod k;\n",
    )]);
    let found = violations(&tree);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("leaves its crate"), "{found:?}");
    // `..` that stays inside the crate is fine; a commented-out attribute is ignored.
    let tree = synthetic(&[(
        "crates/app/src/x/a.rs",
        "#[path = \"../b.rs\"]\nmod b;\n// #[path = \"../../../../elsewhere.rs\"]\n",
    )]);
    assert_eq!(violations(&tree), Vec::<String>::new());
}

#[test]
fn the_checker_catches_a_crate_root_without_forbid() {
    let tree = synthetic(&[(
        "crates/app/src/lib.rs",
        "//! App.\n// #![forbid(unsafe_code)] in a comment does not count.\npub mod a;\n",
    )]);
    let found = violations(&tree);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("crates/app/src/lib.rs") && found[0].contains("forbid"));
    // A binary's root too; a kernel crate's root needs none.
    let tree = synthetic(&[("crates/app/src/main.rs", "fn main() {}\n")]);
    assert_eq!(violations(&tree).len(), 1);
    // A file outside every package is reported.
    let tree = synthetic(&[("loose.rs", "fn main() {}\n")]);
    assert_eq!(violations(&tree).len(), 1);
}
