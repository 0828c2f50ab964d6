"""`haipai`: the LightningCLI (main.py) and one module per extra subcommand."""
