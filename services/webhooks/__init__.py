"""Other-apps sender: user webhooks (Slack incoming webhooks or any HTTPS endpoint), signed (channel "other_apps")."""
