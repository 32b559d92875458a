"""Web push sender: browser subscriptions and VAPID-signed, encrypted pushes (queue channel "browser")."""
