"""The apply layer's side: observe() and observe_late(), and the background publisher of first messages."""
