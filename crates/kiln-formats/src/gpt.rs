//! GUID partition tables and the protective MBR (UEFI 2.10 §5).
