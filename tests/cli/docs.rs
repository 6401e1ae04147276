//! The docs match the code: the reference documents every parameter of every stage kind in that kind's
//! section, every embedded defaults file parses, the README's Layout names what is in the tree, and
//! the engine imports nothing of the ML modules.

#[test]
fn reference_lists_every_stage_parameter() {
    let readme = std::fs::read_to_string(crate::util::repo().join("docs/reference.md")).unwrap();
    for stage in pipe::stages::registry() {
        let kind = stage.kind();
        let defaults: toml::Table = stage.defaults().parse().unwrap_or_else(|e| panic!("stages/{kind}.toml: {e}"));
        let header = format!("### `{kind}`");
        let start = readme.find(&header).unwrap_or_else(|| panic!("docs/reference.md has no section {header}"));
        let section = &readme[start + header.len()..];
        let section = &section[..section.find("\n## ").or_else(|| section.find("\n### ")).unwrap_or(section.len())];
        let mut keys = Vec::new();
        for (k, v) in &defaults {
            match v {
                toml::Value::Table(t) => keys.extend(t.keys().map(|s| format!("{k}.{s}"))),
                _ => keys.push(k.clone()),
            }
        }
        for k in keys {
            assert!(section.contains(&format!("`{k}`")), "docs/reference.md section {header} does not document `{k}`");
        }
        let on_disk = std::fs::read_to_string(crate::util::repo().join(format!("stages/{kind}.toml"))).unwrap();
        assert_eq!(on_disk, stage.defaults(), "stages/{kind}.toml is what the binary embeds");
    }
}

#[test]
fn every_committed_pipeline_is_valid() {
    let registry = pipe::stages::registry();
    let dir = crate::util::repo().join("pipelines");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "toml") {
            let p = pipe::engine::config::load(&path, &Default::default(), &registry)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            pipe::engine::graph::build(&p).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 4, "quickstart, qwen_0_6b, qwen_4b and the GPU smoke pipeline at least");
}

/// The Layout block of the README: each `path/` or `path.rs` it names exists, and every module directory
/// or file under `src/` is named there; every `docs/*.md` the README links to exists.
#[test]
fn readme_layout_matches_the_tree() {
    let repo = crate::util::repo();
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let start = readme.find("## Layout").expect("README has a Layout section");
    let block = &readme[start..];
    let block = &block[block.find("```").unwrap() + 3..];
    let block = &block[..block.find("```").unwrap()];
    let named: Vec<&str> = block
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.ends_with('/') || w.ends_with(".rs"))
        .collect();
    for p in &named {
        assert!(repo.join(p).exists(), "README Layout names `{p}`, which is not in the tree");
    }
    for e in std::fs::read_dir(repo.join("src")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if matches!(name.as_str(), "lib.rs" | "main.rs") {
            continue;
        }
        let shown = if e.path().is_dir() { format!("src/{name}/") } else { format!("src/{name}") };
        assert!(named.contains(&shown.as_str()), "README Layout does not name `{shown}`");
    }
    for (i, _) in readme.match_indices("](docs/") {
        let rest = &readme[i + 2..];
        let link = &rest[..rest.find(')').unwrap()];
        assert!(repo.join(link).is_file(), "README links to `{link}`, which does not exist");
    }
}

/// The engine knows nothing about ML: no code under `src/engine/` (comments aside) uses the ML modules
/// or candle.
#[test]
fn engine_imports_no_ml_module() {
    let dir = crate::util::repo().join("src/engine");
    let forbidden = ["crate::model", "crate::train", "crate::text", "crate::stages", "crate::kernels", "candle"];
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap();
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for f in forbidden {
                assert!(!line.contains(f), "{} uses `{f}`: {line}", e.path().display());
            }
        }
    }
}
