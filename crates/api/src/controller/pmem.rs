//! The controller's virtio-pmem operations (see [`crate::pmem`]).

use super::ApiController;
use crate::error::ApiError;
use crate::pmem::{PartialPmem, Pmem};

impl ApiController {
    /// `PUT /pmem/{id}`: configures a device before boot, hot-plugs one after.
    pub fn put_pmem(&mut self, p: Pmem) -> Result<(), ApiError> {
        if self.hotplugs() {
            return self.hotplug_pmem(p);
        }
        self.configure(|r| r.set_pmem(p))
    }

    /// `PATCH /pmem/{id}` (post-boot): the device's rate limiter.
    pub fn patch_pmem(&mut self, u: PartialPmem) -> Result<(), ApiError> {
        self.require_started()?;
        self.resources.check_pmem_update(&u)?;
        let update = u.clone();
        self.backend.try_call(move |b| b.update_pmem(&update))?;
        self.resources.apply_pmem_update(&u);
        Ok(())
    }
}
