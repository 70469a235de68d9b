from clipserve.cli import main

main()
