"""Clients of the FM Server /ws protocol: the browser page (client/web) and the MIDI bridge."""
