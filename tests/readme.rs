//! Every ```` ```rust ```` block of README.md is compiled: it must be, word
//! for word, one of the files `examples/readme.rs` includes (so CI builds
//! it), in the same order.

use std::path::Path;

#[test]
fn every_rust_block_of_the_readme_is_compiled() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut blocks = Vec::new();
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
            blocks.push(block);
        }
    }
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
