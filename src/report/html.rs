//! One self-contained HTML page: inline CSS, inline SVG, one inline script, no external resource.
//!
//! The script is the page's own check that every chart drew something: for each `<figure class="plot">`
//! it looks for elements in each of the figure's series colours (`data-colors`) with a non-empty
//! bounding box, and writes the verdict into `#plot-check` (`plots-ok: N/N` or `plots-failed: …`).
//! A reader sees it at the foot of the page; the browser test reads it from the DOM headless Chromium
//! dumps (see [`super::browser`]).

use std::fmt::Write as _;

use super::plots::Svg;

/// Escape text for HTML element content and double-quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "\
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:70em;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.3em;margin-top:2em;border-bottom:1px solid #ddd}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td.t,th.t{text-align:left}
tr.hl td{font-weight:600;background:#f7fbff}
figure.plot{display:inline-block;margin:.6em 1em .6em 0;vertical-align:top}
figure.plot svg{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;margin-bottom:.3em}
.legend span{display:inline-block;margin-right:1em;font-size:.85em}
.legend i{display:inline-block;width:.9em;height:.9em;margin-right:.3em;vertical-align:-.1em}
.note{color:#555;font-size:.9em}
#plot-check{color:#777;font-size:.8em;margin-top:3em}
";

const CHECK_SCRIPT: &str = r#"(function () {
  var figs = document.querySelectorAll('figure.plot');
  var bad = [];
  Array.prototype.forEach.call(figs, function (f) {
    var name = f.getAttribute('data-plot');
    var svg = f.querySelector('svg');
    if (!svg) { bad.push(name + ': no svg'); return; }
    var colors = (f.getAttribute('data-colors') || '').split(' ').filter(Boolean);
    if (!colors.length) { bad.push(name + ': no data series'); return; }
    colors.forEach(function (c) {
      var els = svg.querySelectorAll('[stroke="' + c + '"],[fill="' + c + '"]');
      var drawn = Array.prototype.filter.call(els, function (el) {
        var b = el.getBBox();
        return b.width > 0 || b.height > 0;
      });
      if (!drawn.length) { bad.push(name + ': nothing drawn in ' + c); }
    });
  });
  var out = document.getElementById('plot-check');
  out.setAttribute('data-verdict', bad.length ? 'failed' : 'ok');
  out.textContent = bad.length ? 'plots-failed: ' + bad.join('; ')
                               : 'plots-ok: ' + figs.length + '/' + figs.length;
})();"#;

/// Builds a page section by section.
#[derive(Debug, Default, Clone)]
pub struct Page {
    title: String,
    body: String,
    plots: usize,
}

/// A table cell: left-aligned text or a right-aligned number.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Text(String),
    Num(String),
}

impl Cell {
    pub fn text(s: impl Into<String>) -> Cell {
        Cell::Text(s.into())
    }
    fn raw(&self) -> &str {
        match self {
            Cell::Text(s) | Cell::Num(s) => s,
        }
    }
}

/// A table with a header row; `highlight` rows are bold (the model's row among baselines).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
    pub highlight: Vec<usize>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table { header: header.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }
    pub fn row(&mut self, cells: Vec<Cell>) -> &mut Self {
        self.rows.push(cells);
        self
    }

    pub fn html(&self) -> String {
        let mut s = String::from("<table>\n<tr>");
        for (i, h) in self.header.iter().enumerate() {
            let class = if self.rows.first().is_some_and(|r| matches!(r.get(i), Some(Cell::Text(_)))) {
                " class=\"t\""
            } else {
                ""
            };
            let _ = write!(s, "<th{class}>{}</th>", escape(h));
        }
        s.push_str("</tr>\n");
        for (i, r) in self.rows.iter().enumerate() {
            s.push_str(if self.highlight.contains(&i) { "<tr class=\"hl\">" } else { "<tr>" });
            for c in r {
                match c {
                    Cell::Text(t) => {
                        let _ = write!(s, "<td class=\"t\">{}</td>", escape(t));
                    }
                    Cell::Num(t) => {
                        let _ = write!(s, "<td>{}</td>", escape(t));
                    }
                }
            }
            s.push_str("</tr>\n");
        }
        s.push_str("</table>\n");
        s
    }

    /// A GitHub-flavoured markdown table; `|` in cells is escaped and newlines become spaces.
    pub fn markdown(&self) -> String {
        let cell = |t: &str| t.replace('|', "\\|").replace(['\n', '\r'], " ");
        let mut s = format!("| {} |\n|", self.header.iter().map(|h| cell(h)).collect::<Vec<_>>().join(" | "));
        for i in 0..self.header.len() {
            let text = self.rows.first().is_some_and(|r| matches!(r.get(i), Some(Cell::Text(_))));
            s.push_str(if text { "---|" } else { "---:|" });
        }
        s.push('\n');
        for (i, r) in self.rows.iter().enumerate() {
            let bold = self.highlight.contains(&i);
            let cells: Vec<String> = r
                .iter()
                .map(|c| if bold && !c.raw().is_empty() { format!("**{}**", cell(c.raw())) } else { cell(c.raw()) })
                .collect();
            let _ = writeln!(s, "| {} |", cells.join(" | "));
        }
        s
    }
}

impl Page {
    pub fn new(title: impl Into<String>) -> Page {
        Page { title: title.into(), ..Default::default() }
    }

    pub fn h2(&mut self, text: &str) -> &mut Self {
        let _ = writeln!(self.body, "<h2>{}</h2>", escape(text));
        self
    }
    pub fn h3(&mut self, text: &str) -> &mut Self {
        let _ = writeln!(self.body, "<h3>{}</h3>", escape(text));
        self
    }
    pub fn p(&mut self, text: &str) -> &mut Self {
        let _ = writeln!(self.body, "<p>{}</p>", escape(text));
        self
    }
    pub fn note(&mut self, text: &str) -> &mut Self {
        let _ = writeln!(self.body, "<p class=\"note\">{}</p>", escape(text));
        self
    }
    pub fn table(&mut self, t: &Table) -> &mut Self {
        self.body.push_str(&t.html());
        self
    }
    /// Trusted HTML built by this module's callers (a section rendered elsewhere).
    pub fn raw(&mut self, html: &str) -> &mut Self {
        self.body.push_str(html);
        self
    }

    /// A chart with its caption and HTML legend; `id` names it in the self-check's verdict.
    pub fn plot(&mut self, id: &str, svg: &Svg) -> &mut Self {
        self.body.push_str(&figure(id, svg));
        self.plots += 1;
        self
    }

    /// How many charts the page holds.
    pub fn plots(&self) -> usize {
        self.plots
    }

    pub fn finish(&self) -> String {
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{}</title>\n\
             <style>\n{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n{}\
             <p id=\"plot-check\" data-verdict=\"pending\">plot self-check did not run</p>\n\
             <script>\n{CHECK_SCRIPT}\n</script>\n</body>\n</html>\n",
            escape(&self.title),
            escape(&self.title),
            self.body
        )
    }
}

/// `<figure class="plot">` with the series colours the self-check looks for.
pub fn figure(id: &str, svg: &Svg) -> String {
    let colors: Vec<&str> = svg.legend.iter().map(|(_, c)| c.as_str()).collect();
    let mut s = format!(
        "<figure class=\"plot\" data-plot=\"{}\" data-colors=\"{}\">\n<figcaption>{}</figcaption>\n",
        escape(id),
        escape(&colors.join(" ")),
        escape(&svg.title)
    );
    s.push_str(&svg.svg);
    s.push_str("\n<div class=\"legend\">");
    for (name, color) in &svg.legend {
        let _ = write!(s, "<span><i style=\"background:{}\"></i>{}</span>", escape(color), escape(name));
    }
    s.push_str("</div>\n</figure>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_escape_html_and_markdown_and_align_numbers() {
        let mut t = Table::new(&["query", "auc"]);
        t.row(vec![Cell::text("<b>a|b</b>"), Cell::Num("0.5".into())]);
        t.row(vec![Cell::text("model"), Cell::Num("0.9".into())]);
        t.highlight.push(1);
        let h = t.html();
        assert!(h.contains("<td class=\"t\">&lt;b&gt;a|b&lt;/b&gt;</td><td>0.5</td>"), "{h}");
        assert!(h.contains("<tr class=\"hl\"><td class=\"t\">model</td>"), "{h}");
        let m = t.markdown();
        assert_eq!(m, "| query | auc |\n|---|---:|\n| <b>a\\|b</b> | 0.5 |\n| **model** | **0.9** |\n");
    }

    #[test]
    fn page_is_self_contained_and_carries_the_check() {
        let mut p = Page::new("A & B");
        p.h2("x").p("1 < 2");
        let svg = Svg { title: "roc".into(), svg: "<svg></svg>".into(), legend: vec![("m".into(), "#4E79A7".into())] };
        p.plot("roc", &svg);
        let html = p.finish();
        assert_eq!(p.plots(), 1);
        assert!(html.contains("<title>A &amp; B</title>") && html.contains("<p>1 &lt; 2</p>"));
        assert!(html.contains("data-plot=\"roc\" data-colors=\"#4E79A7\""));
        assert!(html.contains("id=\"plot-check\"") && html.contains("plots-ok: "));
        assert!(!html.contains("http://") && !html.contains("https://") && !html.contains(" src="));
    }
}
