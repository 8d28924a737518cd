"""The submission packer."""
