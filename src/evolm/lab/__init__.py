"""The lab: measure what each innovation buys (ablations, scaling fits) and flatten a config into one file."""
