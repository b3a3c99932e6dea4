"""The SAM 3D Segment Editor effect (registered by the SAM3DSegment module at startup)."""
