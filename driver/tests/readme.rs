//! The READMEs' Rust snippets are exact copies of the visible lines of doctests, so what a
//! README shows is compiled and run by `cargo test --doc`: the workspace README against the
//! driver's walkthrough (`driver/src/embedding.md`, the `embedding` module), and
//! `host-device/README.md` against the device crate's (`host-device/src/embedding.md`). Hidden
//! doctest lines (`# ...`) set up the in-process device, guest memory and config. One checker
//! for both crates' READMEs.

/// The Rust code blocks of a markdown text (fence info starting with `rust`), each as its lines;
/// with `visible_only`, rustdoc's hidden lines (`#` alone or followed by a space) are dropped.
fn rust_blocks(markdown: &str, visible_only: bool) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in markdown.lines() {
        match current.as_mut() {
            None => {
                if let Some(info) = line.strip_prefix("```") {
                    if info.trim_start().starts_with("rust") {
                        current = Some(Vec::new());
                    }
                }
            }
            Some(lines) => {
                if line.trim() == "```" {
                    blocks.push(lines.join("\n"));
                    current = None;
                } else {
                    let code = line.trim_start();
                    if !(visible_only && (code == "#" || code.starts_with("# "))) {
                        lines.push(line);
                    }
                }
            }
        }
    }
    assert!(current.is_none(), "unterminated code block");
    blocks
}

fn check(readme: &str, readme_name: &str, doc: &str, doc_name: &str) {
    let snippets = rust_blocks(readme, false);
    let doctests = rust_blocks(doc, true);
    assert!(!snippets.is_empty(), "{readme_name} has no Rust snippet");
    for snippet in &snippets {
        assert!(
            doctests.iter().any(|d| d == snippet),
            "this Rust snippet of {readme_name} is not the visible part of any doctest in \
             {doc_name}; copy it from there:\n{snippet}"
        );
    }
}

#[test]
fn readme_snippets_are_doctested() {
    check(
        include_str!("../../README.md"),
        "README.md",
        include_str!("../src/embedding.md"),
        "driver/src/embedding.md",
    );
}

#[test]
fn device_readme_snippets_are_doctested() {
    check(
        include_str!("../../host-device/README.md"),
        "host-device/README.md",
        include_str!("../../host-device/src/embedding.md"),
        "host-device/src/embedding.md",
    );
}

#[test]
fn the_check_finds_a_changed_snippet() {
    let doc = "```rust\n# let a = 1;\nlet b = a;\n```\n";
    assert_eq!(rust_blocks(doc, true), vec!["let b = a;"]);
    let result = std::panic::catch_unwind(|| {
        check("```rust\nlet b = 2;\n```\n", "readme", doc, "doc");
    });
    assert!(result.is_err());
    check("```rust\nlet b = a;\n```\n", "readme", doc, "doc");
}
