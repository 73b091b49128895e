//! [`InitialMasks`]: where the sparse masks of new adapters come from when they are known
//! in-process, and [`MaskedAdapters`], attaching adapters with them.
//!
//! Masks are runtime state, not configuration: they are not in [`RosaConfig`] (whose fields
//! are the file's). A file of masks is named by the config's `mask_load_path` and read once
//! per attach; masks held in memory (the two-phase recipe's, random ones for tests and
//! ablations) are given when attaching. Either way the [`RosaScheduler`](crate::RosaScheduler)
//! finds them in the model and skips gradient collection.

use burn::module::Module;
use peft_core::PeftModel;
use peft_core::error::Result;

use crate::adapter::create;
use crate::config::RosaConfig;
use crate::masks::RosaMasks;

/// Where the sparse masks of new adapters come from.
#[derive(Clone, Debug, Default)]
pub enum InitialMasks {
    /// None given: the config's `mask_load_path` if set, else the sparse adapter waits for
    /// mask generation.
    #[default]
    None,
    /// These masks, by exact module path.
    Given(RosaMasks),
    /// Uniformly random masks from this seed, different per module path (`mask_load_path`
    /// wins if set): for tests and random-mask ablations.
    Random(u64),
}

impl InitialMasks {
    /// The masks `config` names: its `mask_load_path` file, or none.
    ///
    /// # Errors
    /// The masks file cannot be read.
    pub(crate) fn of_config(config: &RosaConfig) -> Result<Self> {
        Ok(config.file_masks()?.map_or(Self::None, Self::Given))
    }

    /// These masks, or where none are given, those `config` names.
    fn or_config(self, config: &RosaConfig) -> Result<Self> {
        match self {
            Self::Given(_) => Ok(self),
            other => match Self::of_config(config)? {
                Self::None => Ok(other),
                file => Ok(file),
            },
        }
    }
}

/// Attaching RoSA adapters whose masks are known in-process (implemented by
/// [`RosaModel`](crate::RosaModel)).
pub trait MaskedAdapters<M>: Sized {
    /// [`PeftModel::new`] with the masks of the `"default"` adapter given.
    ///
    /// # Errors
    /// As [`PeftModel::new`], and masks that lack a selected layer or do not fit it.
    fn new_with_masks(model: M, config: RosaConfig, masks: InitialMasks) -> Result<Self>;

    /// [`PeftModel::add_adapter`] with the masks of adapter `name` given.
    ///
    /// # Errors
    /// As [`PeftModel::add_adapter`], and masks that lack a selected layer or do not fit it.
    fn add_adapter_with_masks(
        &mut self,
        name: &str,
        config: RosaConfig,
        masks: InitialMasks,
    ) -> Result<()>;
}

impl<M: Module> MaskedAdapters<M> for PeftModel<M, RosaConfig> {
    fn new_with_masks(model: M, config: RosaConfig, masks: InitialMasks) -> Result<Self> {
        let mut peft = PeftModel::empty(model);
        peft.add_adapter_with_masks("default", config, masks)?;
        peft.set_adapter(&["default"])?;
        Ok(peft)
    }

    fn add_adapter_with_masks(
        &mut self,
        name: &str,
        config: RosaConfig,
        masks: InitialMasks,
    ) -> Result<()> {
        config.validate()?;
        let masks = masks.or_config(&config)?;
        let for_layers = config.clone();
        self.add_adapter_with(name, config, move |info| create(&for_layers, info, &masks))
    }
}
