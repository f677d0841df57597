//! dm-verity hash trees and superblocks (kernel Documentation/admin-guide/device-mapper/verity.rst).
