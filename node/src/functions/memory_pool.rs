//! Linear memories reused from call to call instead of mapped and unmapped for each.
//!
//! # Why this exists
//!
//! Every function call instantiates its module afresh, so nothing leaks from one request
//! to the next. With Wasmer's own tunables every instance then maps its own linear
//! memory: an 8 GiB reservation (the 4 GiB wasm32 space and a 4 GiB guard, so compiled
//! code needs no bounds checks), made accessible up to the memory's size, and unmapped
//! when the call's store is dropped. Unmapping a region whose pages were touched frees
//! its page tables and shoots down the TLB of every core that runs one of meshd's
//! threads; with the map and the page faults of the fresh pages that was about a third
//! of a warm call's CPU (the `bench/fn` profile in `bench/README.md`).
//!
//! A [`MemoryPool`] keeps the reservations of ended calls and hands them to later calls,
//! zeroed. The pages a call touched (per `mincore`) are zeroed in place, so they stay
//! mapped and the next call does not fault them in again, up to [`KEEP_RESIDENT`] bytes;
//! beyond that they go back to the kernel (`MADV_DONTNEED`, which reads as zeros). A
//! guest sees what it would see in a fresh mapping: zeros before its data segments are
//! written, its memory accessible up to its current size and not one byte further (the
//! rest of the reservation stays `PROT_NONE`, so an out-of-bounds access still traps).
//!
//! Only Wasmer's static memory style is pooled (the style its default tunables give
//! every wasm32 memory); anything else is left to Wasmer's own implementation.
#![allow(unsafe_code)]

use std::io;
use std::ptr::NonNull;
use std::sync::{Mutex, PoisonError};

use wasmer::sys::vm::{LinearMemory, MemoryError, MemoryStyle, VMMemoryDefinition};
use wasmer::{MemoryType, Pages, WASM_PAGE_SIZE};

/// Touched bytes at the start of a memory that are zeroed in place when it is returned;
/// touched pages beyond are given back to the kernel. Calls of small functions touch far
/// less (the hello example: tens of pages), so their pages stay mapped.
pub const KEEP_RESIDENT: usize = 2 * 1024 * 1024;

/// Idle reservations a pool keeps at most; more are unmapped when returned. One per
/// call thread that ran at the same time is enough to never map in steady state.
pub const MAX_IDLE: usize = 64;

/// The host's page size as `mincore` and `mprotect` count it.
const HOST_PAGE: usize = 4096;

/// Idle, zeroed linear-memory reservations (see the module docs).
#[derive(Debug, Default)]
pub struct MemoryPool {
    idle: Mutex<Vec<Region>>,
}

impl MemoryPool {
    /// A pool with no idle memories yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Idle reservations held now.
    pub fn idle(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Region>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new linear memory of type `ty` (its maximum already the call's cap) whose
    /// definition lives at `location` in the instance's VM context, in a reused
    /// reservation when one is idle.
    ///
    /// # Safety
    /// `location` must point to a valid, writable memory definition that outlives the
    /// returned memory (Wasmer guarantees this for the location it passes to
    /// `Tunables::create_vm_memory`).
    pub unsafe fn create(
        self: &std::sync::Arc<Self>,
        ty: &MemoryType,
        location: NonNull<VMMemoryDefinition>,
    ) -> Result<PooledMemory, MemoryError> {
        if ty.shared {
            return Err(MemoryError::Generic(
                "shared memories are not pooled".to_owned(),
            ));
        }
        if ty.minimum > MemoryStyle::static_bound() {
            return Err(MemoryError::MinimumMemoryTooLarge {
                min_requested: ty.minimum,
                max_allowed: MemoryStyle::static_bound(),
            });
        }
        let reserved = reservation_bytes();
        let mut region = match self.lock().pop() {
            Some(region) => region,
            None => Region::reserve(reserved).map_err(|e| {
                MemoryError::Region(format!("cannot reserve {reserved} bytes: {e}"))
            })?,
        };
        let bytes = ty.minimum.bytes().0;
        if let Err(e) = region.set_accessible(bytes) {
            // Its state is unknown now: unmap it rather than pool it.
            drop(region);
            return Err(MemoryError::Region(format!(
                "cannot make {bytes} bytes accessible: {e}"
            )));
        }
        let mut memory = PooledMemory {
            region: Some(region),
            pool: self.clone(),
            definition: location,
            ty: *ty,
            size: ty.minimum,
        };
        memory.publish();
        Ok(memory)
    }

    /// Takes a memory's reservation back: zeroed and kept, or unmapped when the pool is
    /// full or zeroing failed.
    fn give_back(&self, mut region: Region) {
        if region.zero().is_err() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE {
            idle.push(region);
        }
    }
}

/// Bytes one static-style memory reserves: the wasm32 space and Wasmer's offset guard.
fn reservation_bytes() -> usize {
    let bound = MemoryStyle::static_bound().bytes().0;
    bound + MemoryStyle::static_offset_guard_size() as usize
}

/// One mapped reservation: `PROT_NONE` except its first `accessible` bytes.
#[derive(Debug)]
struct Region {
    base: NonNull<u8>,
    reserved: usize,
    accessible: usize,
}

// SAFETY: a region is plain memory owned by one memory (or the pool) at a time.
unsafe impl Send for Region {}

impl Region {
    /// Maps `reserved` bytes, none accessible yet.
    fn reserve(reserved: usize) -> io::Result<Self> {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserved,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(base.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap gave a null address"))?;
        // Huge pages would make "the pages a call touched" whole 2 MiB blocks to zero.
        // SAFETY: advice on our own mapping; failure only loses the hint.
        unsafe {
            libc::madvise(base.as_ptr().cast(), reserved, libc::MADV_NOHUGEPAGE);
        }
        Ok(Self {
            base,
            reserved,
            accessible: 0,
        })
    }

    /// Makes exactly the first `bytes` bytes readable and writable, the rest `PROT_NONE`.
    /// Pages that become accessible are zero: the pool zeroes a region before it keeps it.
    fn set_accessible(&mut self, bytes: usize) -> io::Result<()> {
        if bytes > self.reserved {
            return Err(io::Error::other(format!(
                "{bytes} bytes are more than the {} reserved",
                self.reserved
            )));
        }
        let (start, len, prot) = if bytes > self.accessible {
            (
                self.accessible,
                bytes - self.accessible,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        } else if bytes < self.accessible {
            (bytes, self.accessible - bytes, libc::PROT_NONE)
        } else {
            return Ok(());
        };
        // SAFETY: the range lies inside our reservation (checked above); wasm pages are
        // multiples of the host page.
        let rc = unsafe { libc::mprotect(self.base.as_ptr().add(start).cast(), len, prot) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        self.accessible = bytes;
        Ok(())
    }

    /// Zeroes the accessible part: resident pages among the first [`KEEP_RESIDENT`]
    /// bytes in place, everything beyond given back to the kernel.
    fn zero(&mut self) -> io::Result<()> {
        let keep = self.accessible.min(KEEP_RESIDENT);
        if keep > 0 {
            let pages = keep.div_ceil(HOST_PAGE);
            let mut resident = [0u8; KEEP_RESIDENT / HOST_PAGE];
            // SAFETY: the range is mapped (accessible) and `resident` has a byte per page.
            let rc = unsafe {
                libc::mincore(
                    self.base.as_ptr().cast(),
                    keep,
                    resident.as_mut_ptr().cast(),
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            for (page, _) in resident[..pages]
                .iter()
                .enumerate()
                .filter(|(_, state)| **state & 1 == 1)
            {
                // SAFETY: a page of the accessible range, owned by this region alone now
                // (its memory and instance are gone).
                unsafe {
                    std::ptr::write_bytes(self.base.as_ptr().add(page * HOST_PAGE), 0, HOST_PAGE);
                }
            }
        }
        if self.accessible > keep {
            // SAFETY: inside our mapping; anonymous private pages read as zeros afterwards.
            let rc = unsafe {
                libc::madvise(
                    self.base.as_ptr().add(keep).cast(),
                    self.accessible - keep,
                    libc::MADV_DONTNEED,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer referenced by any memory.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.reserved);
        }
    }
}

/// A linear memory in a pooled reservation; the reservation goes back to its pool,
/// zeroed, when the memory is dropped (with its call's store).
#[derive(Debug)]
pub struct PooledMemory {
    /// `None` only during drop.
    region: Option<Region>,
    pool: std::sync::Arc<MemoryPool>,
    /// Where compiled code reads the base and length: in the instance's VM context.
    definition: NonNull<VMMemoryDefinition>,
    ty: MemoryType,
    size: Pages,
}

// SAFETY: the region is owned by this memory alone; the definition belongs to the
// instance that owns this memory, and Wasmer moves both together.
unsafe impl Send for PooledMemory {}
// SAFETY: as above; mutation needs `&mut self`.
unsafe impl Sync for PooledMemory {}

impl PooledMemory {
    fn region(&self) -> &Region {
        self.region.as_ref().expect("the region lives until drop")
    }

    /// Writes base and length into the instance's memory definition.
    fn publish(&mut self) {
        let base = self.region().base.as_ptr();
        let length = self.size.bytes().0;
        // SAFETY: `definition` is valid for the memory's lifetime (see `create`).
        unsafe {
            let definition = self.definition.as_mut();
            definition.base = base;
            definition.current_length = length;
        }
    }
}

impl Drop for PooledMemory {
    fn drop(&mut self) {
        if let Some(region) = self.region.take() {
            self.pool.give_back(region);
        }
    }
}

impl LinearMemory for PooledMemory {
    fn ty(&self) -> MemoryType {
        let mut ty = self.ty;
        ty.minimum = self.size;
        ty
    }

    fn size(&self) -> Pages {
        self.size
    }

    fn style(&self) -> MemoryStyle {
        MemoryStyle::Static
    }

    fn grow(&mut self, delta: Pages) -> Result<Pages, MemoryError> {
        let previous = self.size;
        if delta.0 == 0 {
            return Ok(previous);
        }
        let refused = MemoryError::CouldNotGrow {
            current: previous,
            attempted_delta: delta,
        };
        let Some(new_size) = previous.checked_add(delta) else {
            return Err(refused);
        };
        if new_size > self.ty.maximum.unwrap_or(Pages::max_value())
            || new_size > MemoryStyle::static_bound()
        {
            return Err(refused);
        }
        let bytes = new_size.bytes().0;
        let region = self.region.as_mut().expect("the region lives until drop");
        region
            .set_accessible(bytes)
            .map_err(|e| MemoryError::Region(format!("cannot grow to {bytes} bytes: {e}")))?;
        self.size = new_size;
        self.publish();
        Ok(previous)
    }

    fn grow_at_least(&mut self, min_size: u64) -> Result<(), MemoryError> {
        let current = self.size.bytes().0 as u64;
        if current < min_size {
            let pages = (min_size - current).div_ceil(WASM_PAGE_SIZE as u64);
            let pages = u32::try_from(pages).map_err(|_| MemoryError::CouldNotGrow {
                current: self.size,
                attempted_delta: Pages(u32::MAX),
            })?;
            self.grow(Pages(pages))?;
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), MemoryError> {
        let region = self.region.as_mut().expect("the region lives until drop");
        region
            .zero()
            .and_then(|()| region.set_accessible(0))
            .map_err(|e| MemoryError::Region(format!("cannot reset the memory: {e}")))?;
        self.size = Pages(0);
        self.publish();
        Ok(())
    }

    fn vmmemory(&self) -> NonNull<VMMemoryDefinition> {
        self.definition
    }

    fn try_clone(&self) -> Result<Box<dyn LinearMemory + Send + Sync + 'static>, MemoryError> {
        Err(MemoryError::MemoryNotShared)
    }

    fn copy(&self) -> Result<Box<dyn LinearMemory + Send + Sync + 'static>, MemoryError> {
        Err(MemoryError::Generic(
            "a function's memory cannot be copied".to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::UnsafeCell;
    use std::sync::Arc;

    fn definition() -> Box<UnsafeCell<VMMemoryDefinition>> {
        Box::new(UnsafeCell::new(VMMemoryDefinition {
            base: std::ptr::null_mut(),
            current_length: 0,
        }))
    }

    fn create(
        pool: &Arc<MemoryPool>,
        def: &UnsafeCell<VMMemoryDefinition>,
        pages: u32,
        max: u32,
    ) -> PooledMemory {
        let ty = MemoryType::new(Pages(pages), Some(Pages(max)), false);
        let location = NonNull::new(def.get()).unwrap();
        // SAFETY: the definition outlives the memory in every test.
        unsafe { pool.create(&ty, location) }.unwrap()
    }

    /// The memory's bytes as the guest sees them (tests only: nothing else touches them).
    #[allow(clippy::mut_from_ref)]
    fn bytes(memory: &PooledMemory) -> &mut [u8] {
        let def = unsafe { memory.vmmemory().as_ref() };
        unsafe { std::slice::from_raw_parts_mut(def.base, def.current_length) }
    }

    #[test]
    fn a_reused_memory_is_zero_and_only_as_large_as_asked() {
        let pool = Arc::new(MemoryPool::new());
        let def = definition();
        let first = create(&pool, &def, 3, 10);
        let base = unsafe { (*def.get()).base };
        assert_eq!(unsafe { (*def.get()).current_length }, 3 * WASM_PAGE_SIZE);
        let memory = bytes(&first);
        memory[0] = 1;
        memory[WASM_PAGE_SIZE + 17] = 2;
        *memory.last_mut().unwrap() = 3;
        drop(first);
        assert_eq!(pool.idle(), 1);

        let second = create(&pool, &def, 1, 10);
        assert_eq!(
            unsafe { (*def.get()).base },
            base,
            "the reservation is reused"
        );
        assert_eq!(pool.idle(), 0);
        assert!(bytes(&second).iter().all(|b| *b == 0));
        assert_eq!(second.region().accessible, WASM_PAGE_SIZE);
        drop(second);

        let mut third = create(&pool, &def, 1, 10);
        third.grow(Pages(2)).unwrap();
        assert!(
            bytes(&third).iter().all(|b| *b == 0),
            "pages shrunk away and grown back are zero"
        );
    }

    #[test]
    fn growth_stops_at_the_maximum() {
        let pool = Arc::new(MemoryPool::new());
        let def = definition();
        let mut memory = create(&pool, &def, 1, 4);
        assert_eq!(memory.grow(Pages(3)).unwrap(), Pages(1));
        assert_eq!(memory.size(), Pages(4));
        assert!(memory.grow(Pages(1)).is_err());
        assert_eq!(memory.size(), Pages(4));
        assert_eq!(memory.grow(Pages(0)).unwrap(), Pages(4));
    }

    #[test]
    fn pages_beyond_keep_resident_come_back_zero_too() {
        let pool = Arc::new(MemoryPool::new());
        let def = definition();
        let pages = (KEEP_RESIDENT / WASM_PAGE_SIZE) as u32 + 4;
        let memory = create(&pool, &def, pages, pages);
        bytes(&memory).fill(0xAB);
        drop(memory);
        let memory = create(&pool, &def, pages, pages);
        assert!(bytes(&memory).iter().all(|b| *b == 0));
    }

    #[test]
    fn the_pool_keeps_at_most_max_idle() {
        let pool = Arc::new(MemoryPool::new());
        let defs: Vec<_> = (0..MAX_IDLE + 2).map(|_| definition()).collect();
        let memories: Vec<_> = defs.iter().map(|d| create(&pool, d, 1, 1)).collect();
        drop(memories);
        assert_eq!(pool.idle(), MAX_IDLE);
    }
}
