//! `export`: the train stage's model as a serving-ready directory with a model card, inside a
//! pipeline. Thin glue over [`crate::export`], the code behind `pipe export`; the card's provenance
//! comes from the upstream artifacts (this run's record is not written yet).

use serde::Deserialize;
use serde_json::json;

use crate::engine::{
    Contract, JsonMap, Need, ParamError, StageContext, StageError, StageOutput, StageParams, TypedStage,
};
use crate::export::{self, Format, Provenance, Request};

pub const KIND: &str = "export";
pub const VERSION: u32 = 1;
/// The exported model directory.
pub const MODEL_DIR: &str = "model";

/// The trained model in; the analysis optionally, for the card's metrics.
pub const CONTRACT: Contract = Contract {
    needs: &[Need::always(&[super::train::KIND]), Need::optional(&[super::analyze::KIND])],
    writes: &[MODEL_DIR],
};

pub struct Export;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportParams {
    format: String,
    dtype: String,
    license: String,
}

impl ExportParams {
    fn format(&self) -> Result<Format, ParamError> {
        self.format.parse().map_err(|e| ParamError::new("format", e))
    }

    fn dtype(&self) -> Result<Option<candle_core::DType>, ParamError> {
        if self.dtype.is_empty() {
            return Ok(None);
        }
        crate::model::parse_dtype(&self.dtype).map(Some).map_err(|e| ParamError::new("dtype", e))
    }
}

impl StageParams for ExportParams {
    fn validate(&self) -> Result<(), ParamError> {
        self.format()?;
        self.dtype()?;
        Ok(())
    }
}

impl TypedStage for Export {
    type Params = ExportParams;
    const KIND: &'static str = KIND;
    const VERSION: u32 = VERSION;
    const DEFAULTS: &'static str = include_str!("../../stages/export.toml");
    const CONTRACT: Contract = CONTRACT;

    fn run(ctx: &StageContext, p: &ExportParams) -> Result<StageOutput, StageError> {
        let train = ctx.upstream_of(&[super::train::KIND])?.dir.clone();
        let analyze = ctx.optional_upstream(&[super::analyze::KIND])?.map(|u| u.dir.clone());
        let failed = |e: export::ExportError| StageError::Failed(e.to_string());
        let provenance = Provenance::from_upstream(&train, analyze.as_deref()).map_err(failed)?;
        let req = Request {
            src: train.clone(),
            format: p.format()?,
            out: ctx.out.join(MODEL_DIR),
            force: false,
            license: Some(p.license.clone()).filter(|l| !l.is_empty()),
            dtype: p.dtype()?,
        };
        let done =
            export::export_model(&train.join(super::train::MODEL_DIR), Some(provenance), &req).map_err(failed)?;
        let mut stats = JsonMap::new();
        stats.insert("format".into(), json!(done.format));
        stats.insert("architecture".into(), json!(done.architecture));
        stats.insert("pad_token_id".into(), json!(done.pad_token_id));
        stats.insert("files".into(), json!(done.files));
        Ok(StageOutput { metrics: JsonMap::new(), stats })
    }
}
