"""Layer 4: tables, charts and per-class accuracy of finished runs; the sweep's checks. Below the
attack and defense kits because a defense run draws its charts when it finishes."""
