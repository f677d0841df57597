//! FAT12/16/32 (Microsoft FAT specification, "FAT: General Overview of On-Disk Format").
