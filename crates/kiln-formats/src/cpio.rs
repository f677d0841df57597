//! cpio "newc" archives (the initramfs format; kernel Documentation/driver-api/early-userspace).
