"""What every layer may use: file writing, command-line plumbing, devices and runtime set-up."""
