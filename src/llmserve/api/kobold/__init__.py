"""The KoboldAI API (as KoboldCpp serves it), for SillyTavern and KoboldAI Lite."""
