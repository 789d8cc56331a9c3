//! The memory the device shares: the aperture (BAR2) and the card's RAM,
//! mapped from the file descriptors of `HELLO` and `MEM_TABLE`.

use std::fs::File;
use std::sync::Arc;

use vm_memory::{
    ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
    VolatileMemory, VolatileSlice,
};

use super::*;

/// What the host learns and maps when it attaches to a device.
pub struct Attachment {
    /// The device's identity and register snapshot.
    pub hello: DeviceHello,
    /// The aperture, mapped.
    pub aperture: Aperture,
    /// The card's RAM, mapped.
    pub ram: CardRam,
}

/// The aperture: host memory the card sees through BAR2.
pub struct Aperture {
    region: MmapRegion,
}

impl Aperture {
    /// Maps `size` bytes of the aperture fd, shared.
    pub fn map(file: File, size: u64) -> Result<Self> {
        let size = usize::try_from(size).map_err(|_| ProtocolError::Map("aperture size".into()))?;
        let region = MmapRegion::from_file(FileOffset::new(file, 0), size)
            .map_err(|e| ProtocolError::Map(format!("aperture: {e}")))?;
        Ok(Aperture { region })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.region.size() as u64
    }

    /// The aperture fd.
    pub fn file(&self) -> &File {
        self.region.file_offset().expect("file-backed").file()
    }

    /// A volatile view of `len` bytes at `offset`.
    pub fn slice(&self, offset: u64, len: usize) -> Result<VolatileSlice<'_>> {
        let offset = usize::try_from(offset).map_err(|_| ProtocolError::Map("offset".into()))?;
        self.region
            .get_slice(offset, len)
            .map_err(|e| ProtocolError::Map(format!("aperture range: {e}")))
    }

    /// Reads a plain-old-data value at `offset`.
    pub fn read_obj<T: ByteValued>(&self, offset: u64) -> Result<T> {
        self.slice(offset, std::mem::size_of::<T>())?
            .read_obj(0)
            .map_err(|e| ProtocolError::Map(e.to_string()))
    }

    /// Writes a plain-old-data value at `offset`.
    pub fn write_obj<T: ByteValued>(&self, offset: u64, v: T) -> Result<()> {
        self.slice(offset, std::mem::size_of::<T>())?
            .write_obj(v, 0)
            .map_err(|e| ProtocolError::Map(e.to_string()))
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.slice(offset, buf.len())?
            .read_slice(buf, 0)
            .map_err(|e| ProtocolError::Map(e.to_string()))
    }

    /// Writes `buf` at `offset`.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.slice(offset, buf.len())?
            .write_slice(buf, 0)
            .map_err(|e| ProtocolError::Map(e.to_string()))
    }
}

/// The card's RAM (and the aperture while BAR2 is mapped), as the device's
/// latest `MEM_TABLE` describes it, mapped into this process.
pub struct CardRam {
    memory: GuestMemoryMmap,
    table: Vec<MemRegion>,
}

impl CardRam {
    /// Maps every region of a `MEM_TABLE`.
    pub fn map(table: Vec<(MemRegion, File)>) -> Result<Self> {
        let mut regions = Vec::with_capacity(table.len());
        let mut descr = Vec::with_capacity(table.len());
        for (r, file) in table {
            let size = usize::try_from(r.size).map_err(|_| ProtocolError::Map("size".into()))?;
            let mapping = MmapRegion::from_file(FileOffset::new(file, r.fd_offset), size)
                .map_err(|e| ProtocolError::Map(format!("region at {:#x}: {e}", r.gpa)))?;
            let region = GuestRegionMmap::with_arc(Arc::new(mapping), GuestAddress(r.gpa))
                .ok_or_else(|| ProtocolError::Map(format!("region at {:#x} overflows", r.gpa)))?;
            regions.push(region);
            descr.push(r);
        }
        let memory = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| ProtocolError::Map(format!("memory table: {e}")))?;
        Ok(CardRam {
            memory,
            table: descr,
        })
    }

    /// The mapped memory, addressed by card physical address.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The table as the device sent it.
    pub fn table(&self) -> &[MemRegion] {
        &self.table
    }

    /// Reads card memory at `gpa`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.memory
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| ProtocolError::Map(e.to_string()))
    }

    /// Writes card memory at `gpa`.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<()> {
        self.memory
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|e| ProtocolError::Map(e.to_string()))
    }
}
