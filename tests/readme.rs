//! Every ```` ```rust ```` block of README.md is compiled: it must be, word
//! for word, one of the files `examples/readme.rs` includes (so CI builds
//! it), in the same order, or the whole service's `src/main.rs`
//! (`examples/minimal-service`, built on its own by scripts/minimal-service.sh).

use std::path::Path;

#[test]
fn every_rust_block_of_the_readme_is_compiled() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let minimal = root.join("examples/minimal-service/src/main.rs");
    let minimal_main = std::fs::read_to_string(&minimal).unwrap();
    let mut blocks = Vec::new();
    let mut minimal_blocks = 0;
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        if line.trim_start().starts_with("```rust") {
            let mut block = String::new();
            for line in lines.by_ref() {
                if line.trim_start().starts_with("```") {
                    break;
                }
                block.push_str(line);
                block.push('\n');
            }
            assert!(
                line.trim() == "```rust",
                "README blocks are compiled; `{line}` would exempt one from that"
            );
            if block.starts_with("//! src/main.rs of a whole service") {
                assert_eq!(
                    block,
                    minimal_main,
                    "README's whole service differs from {}; copy one onto the other",
                    minimal.display()
                );
                minimal_blocks += 1;
            } else {
                blocks.push(block);
            }
        }
    }
    assert_eq!(minimal_blocks, 1, "README shows the whole service once");
    let dir = root.join("examples/readme");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    let included = std::fs::read_to_string(root.join("examples/readme.rs")).unwrap();
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            included.contains(&format!("include!(\"readme/{name}\")")),
            "examples/readme.rs does not include {name}"
        );
    }
    assert_eq!(
        blocks.len(),
        files.len(),
        "README.md has {} rust blocks, examples/readme/ {} files",
        blocks.len(),
        files.len()
    );
    for (index, (block, file)) in blocks.iter().zip(&files).enumerate() {
        let compiled = std::fs::read_to_string(file).unwrap();
        assert_eq!(
            block,
            &compiled,
            "README rust block {} differs from {}; copy one onto the other",
            index + 1,
            file.display()
        );
    }
}

/// The whole service's dependencies in README.md are its Cargo.toml's, with
/// `git = "…"` where the checkout uses paths.
#[test]
fn the_readme_shows_the_whole_service_dependencies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let manifest =
        std::fs::read_to_string(root.join("examples/minimal-service/Cargo.toml")).unwrap();
    let dependencies = &manifest[manifest.find("[dependencies]").unwrap()..];
    let shown = dependencies
        .replace(r#"path = "../../outbox-core""#, r#"git = "…""#)
        .replace(r#"path = "../../outbox-cli""#, r#"git = "…""#);
    assert!(
        readme.contains(&format!("```toml\n{shown}```")),
        "README.md does not show examples/minimal-service/Cargo.toml's dependencies:\n{shown}"
    );
}

/// Every setting is in README.md's settings table.
#[test]
fn every_setting_is_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let table = &readme[readme
        .find("| django-outbox-pattern | outbox | default |")
        .unwrap()..];
    let missing: Vec<&str> = outbox_core::Settings::keys()
        .map(|(key, _)| key)
        .filter(|key| !table.contains(&format!("`{key}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "settings missing from README.md's table: {missing:?}"
    );
}
