"""The parts of the lineage, one innovation per file."""
