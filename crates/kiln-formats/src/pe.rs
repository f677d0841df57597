//! PE/COFF images and Unified Kernel Image assembly (Microsoft PE format; UAPI UKI spec).
