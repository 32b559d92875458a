"""The websocket gateway and the web app: bell feed, pop-ups, in-tab browser notifications, settings pages."""
