//! The stage DAG: `needs` edges, cycle reporting, and a deterministic topological order.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use petgraph::graph::{DiGraph, NodeIndex};

use super::config::{ConfigError, Pipeline};

/// Stages as a graph; edges point from a stage to the stages that need it.
pub struct Dag {
    pub graph: DiGraph<String, ()>,
    /// Indices into `Pipeline::stages`, upstream first; ties broken by file order so runs are repeatable.
    pub order: Vec<usize>,
}

pub fn build(p: &Pipeline) -> Result<Dag, ConfigError> {
    let mut graph = DiGraph::new();
    let nodes: Vec<NodeIndex> = p.stages.iter().map(|s| graph.add_node(s.id.clone())).collect();
    let index = |id: &str| p.stages.iter().position(|s| s.id == id);
    for (i, s) in p.stages.iter().enumerate() {
        for n in &s.needs {
            // config::load already rejected unknown ids; keep the check for hand-built pipelines.
            let j = index(n).ok_or_else(|| ConfigError {
                origin: p.file.display().to_string(),
                key: format!("stages.{}.needs", s.id),
                message: format!("unknown stage `{n}`"),
                hint: None,
            })?;
            graph.update_edge(nodes[j], nodes[i], ());
        }
    }
    if let Some(cycle) = find_cycle(&graph) {
        let mut names: Vec<&str> = cycle.iter().map(|n| graph[*n].as_str()).collect();
        names.push(names[0]);
        return Err(ConfigError {
            origin: p.file.display().to_string(),
            key: format!("stages.{}.needs", graph[cycle[0]]),
            message: format!("dependency cycle: {}", names.join(" → ")),
            hint: Some("remove one of these `needs` entries".into()),
        });
    }
    // Kahn's algorithm with a min-heap on file position.
    let mut indeg: Vec<usize> =
        nodes.iter().map(|n| graph.neighbors_directed(*n, petgraph::Incoming).count()).collect();
    let mut ready: BinaryHeap<Reverse<usize>> = (0..nodes.len()).filter(|i| indeg[*i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for m in graph.neighbors_directed(nodes[i], petgraph::Outgoing) {
            let j = m.index();
            indeg[j] -= 1;
            if indeg[j] == 0 {
                ready.push(Reverse(j));
            }
        }
    }
    Ok(Dag { graph, order })
}

/// One cycle, as the nodes along it, starting from the smallest index in it (stable messages).
fn find_cycle(g: &DiGraph<String, ()>) -> Option<Vec<NodeIndex>> {
    for scc in petgraph::algo::tarjan_scc(g) {
        let self_loop = scc.len() == 1 && g.contains_edge(scc[0], scc[0]);
        if scc.len() < 2 && !self_loop {
            continue;
        }
        let start = *scc.iter().min()?;
        // Walk inside the SCC back to `start`, preferring the lowest-index successor (BFS for shortest).
        let in_scc = |n: &NodeIndex| scc.contains(n);
        let mut prev = vec![None; g.node_count()];
        let mut queue = std::collections::VecDeque::from([start]);
        let mut seen = vec![false; g.node_count()];
        seen[start.index()] = true;
        while let Some(n) = queue.pop_front() {
            let mut next: Vec<NodeIndex> = g.neighbors(n).filter(in_scc).collect();
            next.sort();
            for m in next {
                if m == start {
                    let mut path = vec![n];
                    let mut cur = n;
                    while let Some(p) = prev[cur.index()] {
                        path.push(p);
                        cur = p;
                    }
                    path.reverse();
                    return Some(path);
                }
                if !seen[m.index()] {
                    seen[m.index()] = true;
                    prev[m.index()] = Some(n);
                    queue.push_back(m);
                }
            }
        }
    }
    None
}

/// Text rendering for `pipe dag`: one line per stage in run order with what it needs.
pub fn render_text(p: &Pipeline, dag: &Dag) -> String {
    let mut out = String::new();
    for &i in &dag.order {
        let s = &p.stages[i];
        if s.needs.is_empty() {
            out.push_str(&format!("{} [{}]\n", s.id, s.kind));
        } else {
            out.push_str(&format!("{} [{}] ← {}\n", s.id, s.kind, s.needs.join(", ")));
        }
    }
    out
}

/// Graphviz rendering for `pipe dag --dot`.
pub fn render_dot(p: &Pipeline, dag: &Dag) -> String {
    let mut out = format!("digraph \"{}\" {{\n  rankdir=LR;\n", p.name);
    for &i in &dag.order {
        let s = &p.stages[i];
        out.push_str(&format!("  \"{}\" [label=\"{}\\n({})\"];\n", s.id, s.id, s.kind));
    }
    for &i in &dag.order {
        let s = &p.stages[i];
        for n in &s.needs {
            out.push_str(&format!("  \"{}\" -> \"{}\";\n", n, s.id));
        }
    }
    out.push_str("}\n");
    out
}
