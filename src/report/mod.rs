//! Reports: tables (HTML and markdown), SVG charts and one self-contained HTML page.
//!
//! Stages compose pages from these parts (the analyze stage is the main user). A page loads with no
//! network: CSS, SVG and its one script are inline, charts are drawn to SVG strings by plotters
//! without any font file ([`plots`]), and the page checks by itself that every chart drew content
//! ([`html`]), which is what the headless-browser test reads back ([`browser`]). `pipe compare`'s
//! intervals and paired differences come from [`uncertainty`].

pub mod browser;
pub mod html;
pub mod plots;
pub mod sweep;
pub mod uncertainty;

pub use html::{escape, Cell, Page, Table};
pub use sweep::sweep_section;
